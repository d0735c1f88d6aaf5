"""Compositing the reconstructed garment over white or onto a transparent canvas.

Edges get a light feather, and semi-transparent edge pixels take the garment's own local
colour instead of their photographed one: on the photo they were part backdrop, part
mannequin, and either would show as a fringe on the new background. An optional soft drop
shadow sits under the garment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from workers.pipelines.ghost.segmentation import FloatImage, RGBArray, erode, normalized_blur

Background = Literal["white", "transparent"]


@dataclass(frozen=True)
class ShadowStyle:
    """A soft drop shadow: offset down by ``offset`` of the garment height, blurred by ``blur``."""

    opacity: float = 0.28
    offset: float = 0.015
    blur: float = 0.025


def feather_alpha(alpha: FloatImage, sigma: float) -> FloatImage:
    """Soften the alpha's edge by ``sigma`` px without eating into the solid interior."""
    a = np.clip(np.asarray(alpha, np.float32), 0.0, 1.0)
    if sigma <= 0:
        return a
    soft = np.asarray(cv2.GaussianBlur(a, (0, 0), sigma), np.float32)
    solid = erode(a >= 0.999, max(1, round(2 * sigma)))
    soft[solid] = 1.0
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


def decontaminate(rgb: RGBArray, alpha: FloatImage, *, radius: float = 3.0) -> FloatImage:
    """Replace the colour of semi-transparent pixels by the nearby solid foreground colour."""
    img = rgb.astype(np.float32)
    solid = alpha >= 0.98
    edge = (alpha > 0.0) & ~solid
    if not edge.any() or not solid.any():
        return img
    local = normalized_blur(img, solid, radius)
    out = img.copy()
    out[edge] = local[edge]
    return out


def drop_shadow(alpha: FloatImage, style: ShadowStyle) -> FloatImage:
    """Shadow opacity per pixel, cast straight down from the garment's alpha."""
    h, _ = alpha.shape
    ys = np.nonzero(alpha.max(1) > 0.5)[0]
    height = float(ys.max() - ys.min() + 1) if len(ys) else float(h)
    dy = max(1, round(style.offset * height))
    shifted = np.zeros_like(alpha)
    shifted[dy:] = alpha[:-dy]
    blurred = cv2.GaussianBlur(shifted, (0, 0), max(1.0, style.blur * height))
    return (np.asarray(blurred, np.float32) * style.opacity).astype(np.float32)


def composite(
    rgb: RGBArray,
    alpha: FloatImage,
    *,
    background: Background = "white",
    shadow: ShadowStyle | None = None,
    feather: float = 0.7,
) -> tuple[Image.Image, FloatImage, FloatImage]:
    """Composite the garment; returns (image, final alpha, decontaminated foreground RGB).

    White gives an RGB image; transparent gives RGBA with straight (unpremultiplied) alpha, the
    shadow included as translucent black.
    """
    a = feather_alpha(alpha, feather)
    fg = decontaminate(rgb, a)
    a3 = a[..., None]
    if background == "white":
        bg = np.full_like(fg, 255.0)
        if shadow is not None:
            bg *= 1.0 - drop_shadow(a, shadow)[..., None]
        out = fg * a3 + bg * (1.0 - a3)
        image = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
        return image, a, fg
    out_a = a.copy()
    colour = fg.copy()
    if shadow is not None:
        s = drop_shadow(a, shadow)
        out_a = np.asarray(a + s * (1.0 - a), np.float32)
        # Straight alpha: the black shadow only dilutes the colour where it shows through.
        colour = np.asarray(fg * (a / np.maximum(out_a, 1e-6))[..., None], np.float32)
    rgba = np.dstack([np.clip(np.round(colour), 0, 255), np.clip(np.round(out_a * 255), 0, 255)])
    return Image.fromarray(rgba.astype(np.uint8), "RGBA"), a, fg
