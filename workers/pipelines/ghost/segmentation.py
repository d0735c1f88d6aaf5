"""Backdrop / garment / body segmentation for studio photos.

The classical default assumes what a ghost-mannequin studio provides: a plain backdrop (a
smooth gradient and sensor noise are fine) and a mannequin of one colour, or a model. It runs
in three steps:

1. **Backdrop** — a quadratic colour surface is fitted robustly to a band along the image
   borders; pixels within a noise-derived ΔE of it are backdrop. Edges are refined with a
   two-colour matte so that the 50% alpha line, not the threshold, decides the boundary.
2. **Colours** — the garment's colours come from the foreground's *core* (the region deepest
   inside the silhouette, which is garment on a dressed mannequin); the body's from the
   foreground's *extremities* (the top band: head/neck or the waist form; the bottom band:
   legs, stand; the left and right extremes: hands). A colour seen at both is assigned to
   whichever it dominates. If no body colour emerges, a skin-tone rule is the fallback.
3. **Labels** — each clearly interior foreground pixel takes its nearest colour centre; edge
   pixels, whose colour is mixed with the backdrop, take the majority label around them.

Caller-supplied masks override any step, and a learned :class:`Segmenter` (loaded from local
weights) plugs into the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

Mask = NDArray[np.bool_]
FloatImage = NDArray[np.float32]
RGBArray = NDArray[np.uint8]

BodyKind = Literal["mannequin", "skin", "supplied", "none"]

# Minimum ΔE (CIE76) between a pixel and the fitted backdrop for it to be foreground; the
# measured border noise can raise it, never lower it.
MIN_BACKDROP_DELTA_E = 6.0
# Two colour centres closer than this (ΔE) are treated as the same colour.
SAME_COLOUR_DELTA_E = 14.0


@dataclass(frozen=True)
class ColourModel:
    """Colour centres (CIE Lab, L in 0..100) describing the garment and the body."""

    garment: NDArray[np.float32]  # (k, 3)
    garment_weights: NDArray[np.float32]  # (k,), sum 1
    body: NDArray[np.float32]  # (m, 3); may be empty
    body_kind: BodyKind


@dataclass(frozen=True)
class Segmentation:
    """Masks over the image (H, W) plus what later stages need from the analysis."""

    backdrop: Mask
    garment: Mask
    body: Mask
    alpha: FloatImage  # soft garment alpha in 0..1, fractional only on garment/backdrop edges
    backdrop_rgb: FloatImage  # (H, W, 3) fitted backdrop colour, 0..255
    colours: ColourModel
    source: Literal["classical", "model", "supplied"]


@dataclass(frozen=True)
class SegmenterOutput:
    """Per-pixel probabilities from a learned segmenter, at the input's size."""

    garment: FloatImage
    body: FloatImage | None = None


class Segmenter(Protocol):
    """A learned segmenter (for example SAM or a human parser) loaded from local weights."""

    def predict(self, rgb: RGBArray) -> SegmenterOutput:
        """Return garment (and optionally body) probabilities for an RGB image."""
        ...


# --- colour helpers ------------------------------------------------------------------------


def as_rgb_array(image: Image.Image | RGBArray) -> RGBArray:
    """An (H, W, 3) uint8 RGB array from a PIL image or array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
    return arr


def rgb_to_lab(rgb: NDArray[np.uint8] | NDArray[np.float32]) -> FloatImage:
    """CIE Lab (L 0..100, a/b about -128..127) of RGB values 0..255, any leading shape."""
    arr = np.asarray(rgb, dtype=np.float32)
    shape = arr.shape
    flat = (arr.reshape(-1, 1, 3) / 255.0).astype(np.float32)
    lab = cv2.cvtColor(flat, cv2.COLOR_RGB2Lab)
    return np.asarray(lab, dtype=np.float32).reshape(shape)


def lab_to_rgb(lab: NDArray[np.float32]) -> FloatImage:
    """Inverse of :func:`rgb_to_lab`, RGB in 0..255."""
    arr = np.asarray(lab, dtype=np.float32)
    rgb = cv2.cvtColor(arr.reshape(-1, 1, 3), cv2.COLOR_Lab2RGB)
    return (np.asarray(rgb, dtype=np.float32) * 255.0).reshape(arr.shape)


def kmeans(
    samples: NDArray[np.float32], k: int, *, iters: int = 20, seed: int = 0
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.intp]]:
    """Deterministic k-means (k-means++ seeding): (centres, weights, labels), heaviest first."""
    x = np.asarray(samples, dtype=np.float32)
    n = len(x)
    if n == 0:
        return np.zeros((0, x.shape[1]), np.float32), np.zeros(0, np.float32), np.zeros(0, np.intp)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]), np.float32)
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for i in range(1, k):
        total = float(d2.sum())
        idx = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres[i] = x[idx]
        d2 = np.minimum(d2, ((x - centres[i]) ** 2).sum(1))
    labels = np.zeros(n, np.intp)
    for _ in range(iters):
        dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(2)
        new = np.argmin(dist, axis=1)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = members.mean(0)
            else:
                centres[j] = x[int(np.argmax(dist.min(1)))]
    counts = np.bincount(labels, minlength=k).astype(np.float32)
    order = np.argsort(-counts, kind="stable")
    remap = np.empty(k, np.intp)
    remap[order] = np.arange(k)
    return centres[order], (counts[order] / n).astype(np.float32), remap[labels]


def skin_mask(rgb: RGBArray) -> Mask:
    """Skin-tone pixels by the classic YCrCb box rule (covers light to dark complexions)."""
    ycrcb = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb))
    y, cr, cb = ycrcb[..., 0], ycrcb[..., 1], ycrcb[..., 2]
    return np.asarray((cr >= 135) & (cr <= 175) & (cb >= 80) & (cb <= 130) & (y >= 40))


def _subsample(x: NDArray[np.float32], limit: int, seed: int = 0) -> NDArray[np.float32]:
    if len(x) <= limit:
        return x
    idx = np.random.default_rng(seed).choice(len(x), limit, replace=False)
    return x[np.sort(idx)]


# --- morphology helpers --------------------------------------------------------------------


def disk(radius: int) -> NDArray[np.uint8]:
    """An elliptical structuring element of the given radius."""
    size = 2 * max(radius, 0) + 1
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)), np.uint8)


def dilate(mask: Mask, radius: int) -> Mask:
    """Binary dilation with a disk."""
    if radius <= 0:
        return mask.copy()
    return np.asarray(cv2.dilate(mask.astype(np.uint8), disk(radius))) > 0


def erode(mask: Mask, radius: int) -> Mask:
    """Binary erosion with a disk (outside the image counts as set, so borders survive)."""
    if radius <= 0:
        return mask.copy()
    out = cv2.erode(mask.astype(np.uint8), disk(radius), borderType=cv2.BORDER_REPLICATE)
    return np.asarray(out) > 0


def remove_small(mask: Mask, min_area: int) -> Mask:
    """Drop 8-connected components smaller than ``min_area`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    stats = np.asarray(stats)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return np.asarray(keep[np.asarray(labels)])


def fill_small_holes(mask: Mask, max_area: int) -> Mask:
    """Fill background components of ``mask`` smaller than ``max_area`` not touching the border."""
    holes = ~mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=4)
    stats = np.asarray(stats)
    lab = np.asarray(labels)
    h, w = mask.shape
    fill = np.zeros(n, bool)
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches = x == 0 or y == 0 or x + bw == w or y + bh == h
        fill[i] = area < max_area and not touches
    return np.asarray(mask | fill[lab])


def normalized_blur(values: FloatImage, weight: Mask | FloatImage, sigma: float) -> FloatImage:
    """Gaussian average of ``values`` over the pixels in ``weight`` (normalized convolution)."""
    wgt = np.asarray(weight, np.float32)
    vals = np.asarray(values, np.float32)
    num = cv2.GaussianBlur(vals * (wgt[..., None] if vals.ndim == 3 else wgt), (0, 0), sigma)
    den = cv2.GaussianBlur(wgt, (0, 0), sigma)
    den = np.maximum(np.asarray(den, np.float32), 1e-6)
    out = np.asarray(num, np.float32) / (den[..., None] if vals.ndim == 3 else den)
    return out.astype(np.float32)


# --- backdrop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackdropFit:
    """The fitted backdrop colour surface and the foreground threshold derived from its noise."""

    rgb: FloatImage  # (H, W, 3)
    lab: FloatImage  # (H, W, 3)
    threshold: float  # ΔE


def _design(xs: NDArray[np.float32], ys: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)


def fit_backdrop(rgb: RGBArray, lab: FloatImage | None = None) -> BackdropFit:
    """Fit a quadratic colour surface to the border band, ignoring objects that touch it.

    Iteratively reweighted: samples far from the current fit (a stand base or a head cut by
    the frame) are dropped before refitting.
    """
    h, w, _ = rgb.shape
    band = max(4, round(0.03 * min(h, w)))
    border = np.zeros((h, w), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    ys, xs = np.nonzero(border)
    step = max(1, len(xs) // 6000)
    ys, xs = ys[::step], xs[::step]
    nx = (xs / max(w - 1, 1) * 2 - 1).astype(np.float32)
    ny = (ys / max(h - 1, 1) * 2 - 1).astype(np.float32)
    a = _design(nx, ny)
    target = rgb[ys, xs].astype(np.float32)
    keep = np.ones(len(xs), bool)
    coef = np.zeros((6, 3), np.float32)
    for _ in range(4):
        coef = np.linalg.lstsq(a[keep], target[keep], rcond=None)[0].astype(np.float32)
        resid = np.linalg.norm(a @ coef - target, axis=1)
        scale = float(np.median(resid[keep])) * 1.5 + 1.0
        new_keep = resid < max(3.0 * scale, 6.0)
        if new_keep.sum() < 50 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    full = _design(gx / max(w - 1, 1) * 2 - 1, gy / max(h - 1, 1) * 2 - 1)
    model = np.clip(full.reshape(-1, 6) @ coef, 0, 255).reshape(h, w, 3).astype(np.float32)
    model_lab = rgb_to_lab(model)
    img_lab = rgb_to_lab(rgb) if lab is None else lab
    d = np.linalg.norm(img_lab[ys, xs] - model_lab[ys, xs], axis=1)[keep]
    noise = float(np.quantile(d, 0.995)) if len(d) else 0.0
    return BackdropFit(model, model_lab, max(MIN_BACKDROP_DELTA_E, 1.5 * noise))


def _foreground(rgb: RGBArray, lab: FloatImage, fit: BackdropFit) -> tuple[Mask, FloatImage]:
    """Binary foreground and a soft matte, refined on a thin band around the silhouette."""
    h, w = rgb.shape[:2]
    dist = np.linalg.norm(lab - fit.lab, axis=2)
    cand = dist > fit.threshold
    cand = np.asarray(cv2.medianBlur(cand.astype(np.uint8), 3)) > 0
    area = h * w
    # Backdrop-coloured patches inside the silhouette (a light print) are not backdrop unless
    # they are big or reach the frame.
    cand = fill_small_holes(cand, max(16, area // 400))
    cand = remove_small(cand, max(16, area // 2000))
    sure_fg = erode(cand, 2)
    band = dilate(cand, 2) & ~sure_fg
    img = rgb.astype(np.float32)
    fg_rgb = normalized_blur(img, sure_fg, 3.0)
    diff_fb = fg_rgb - fit.rgb
    denom = np.maximum((diff_fb**2).sum(2), 1.0)
    alpha_band = ((img - fit.rgb) * diff_fb).sum(2) / denom
    # Where the local object colour is too close to the backdrop the matte is unreliable.
    reliable = np.sqrt(denom) > 12.0
    alpha = sure_fg.astype(np.float32)
    use = band & reliable
    alpha[use] = np.clip(alpha_band[use], 0.0, 1.0)
    keep_cand = band & ~reliable
    alpha[keep_cand] = cand[keep_cand].astype(np.float32)
    fg = alpha >= 0.5
    fg = remove_small(fg, max(16, area // 2000))
    alpha[~dilate(fg, 1)] = 0.0
    return fg, alpha.astype(np.float32)


# --- garment / body colours ----------------------------------------------------------------


def _core(fg: Mask) -> Mask:
    dist = np.asarray(cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5), np.float32)
    peak = float(dist.max())
    return np.asarray(dist >= 0.55 * peak) if peak > 0 else fg


def _extremities(fg: Mask) -> Mask:
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return fg
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    dh = max(2, round(0.07 * (bottom - top + 1)))
    dw = max(2, round(0.05 * (right - left + 1)))
    ext = np.zeros_like(fg)
    ext[top : top + dh] = True
    ext[bottom - dh + 1 : bottom + 1] = True
    ext[:, left : left + dw] = True
    ext[:, right - dw + 1 : right + 1] = True
    return np.asarray(ext & erode(fg, 2))


def _gradient(lab: FloatImage) -> FloatImage:
    smooth = cv2.GaussianBlur(lab, (0, 0), 0.7)
    gx = np.asarray(cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3), np.float32) / 8.0
    gy = np.asarray(cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3), np.float32) / 8.0
    return np.asarray(np.sqrt((gx**2 + gy**2).sum(2)), np.float32)


def _shading_clusters(
    lab: FloatImage, inner: Mask, core: Mask, centres: NDArray[np.float32], candidate: Mask
) -> Mask:
    """Candidates that are only the garment in shadow: they meet it without a colour edge.

    A garment's edges are often darker than its core and so cluster apart, yet they blend
    into the garment smoothly; a real body part meets the garment at a sharp colour step.
    """
    if not candidate.any() or candidate.all():
        return np.zeros(len(centres), bool)
    px = lab[inner]
    d = ((px[:, None, :] - centres[None]) ** 2).sum(2)
    label = np.full(inner.shape, -1, np.intp)
    label[inner] = np.argmin(d, axis=1)
    grad = _gradient(lab)
    # The quieter half of the core measures noise and shading, not the garment's print.
    reference = float(np.quantile(grad[core], 0.25)) if core.any() else 1.0
    threshold = max(3.0 * reference, 4.0)
    garment_px = inner & np.isin(label, np.nonzero(~candidate)[0])
    near_garment = dilate(garment_px, 1)
    shading = np.zeros(len(centres), bool)
    min_area = max(20, inner.size // 2000)
    for j in np.nonzero(candidate)[0]:
        # Only solid regions count: thin specks of this colour on a print's edges do not.
        region = np.asarray(
            cv2.morphologyEx((label == j).astype(np.uint8), cv2.MORPH_OPEN, disk(1))
        )
        border = remove_small(region > 0, min_area) & near_garment
        if border.sum() >= 20:
            shading[j] = float(np.median(grad[border])) < threshold
    return shading


def estimate_colours(lab: FloatImage, fg: Mask, rgb: RGBArray) -> ColourModel:
    """Garment colours from the silhouette's core, body colours from its extremities.

    Core and extremity samples are clustered together; a cluster is body when its share of the
    extremity samples clearly exceeds its share of the core samples, garment when it holds a
    real part of the core. A colour at both ends (a sleeve reaching the frame's side, a body
    colour leaking into the core) thus lands where it dominates.
    """
    inner = erode(fg, 2)
    core = _core(fg) & inner
    core_samples = _subsample(lab[core], 3000)
    ext_samples = _subsample(lab[_extremities(fg)], 3000, seed=1)
    n_core, n_ext = len(core_samples), len(ext_samples)
    centres, _, labels = kmeans(np.concatenate([core_samples, ext_samples]), 6)
    k = len(centres)
    core_share = np.bincount(labels[:n_core], minlength=k) / max(n_core, 1)
    ext_share = np.bincount(labels[n_core:], minlength=k) / max(n_ext, 1)
    is_body = (ext_share > 2.0 * core_share + 0.01) & (ext_share >= 0.03)
    is_body &= ~_shading_clusters(lab, inner, core, centres, is_body)
    is_garment = ~is_body & (core_share >= 0.04)
    if not is_garment.any():
        is_garment = ~is_body & (core_share > 0)
    g_centres = centres[is_garment]
    g_weights = core_share[is_garment].astype(np.float32)
    g_weights = (g_weights / max(float(g_weights.sum()), 1e-6)).astype(np.float32)
    body_arr = centres[is_body]

    kind: BodyKind = "mannequin"
    if len(body_arr) == 0:
        # Fallback for a model whose skin did not reach the extremities: skin-tone pixels
        # outside the core whose colour the garment does not have.
        samples = lab[skin_mask(rgb) & inner & ~core]
        if len(g_centres) and len(samples):
            near = np.linalg.norm(samples[:, None, :] - g_centres[None], axis=2).min(1)
            samples = samples[near >= SAME_COLOUR_DELTA_E]
        if len(samples) >= 30:
            s_centres, s_weights, _ = kmeans(_subsample(samples, 3000), 2)
            body_arr = s_centres[s_weights >= 0.1]
            kind = "skin"
        else:
            kind = "none"
    elif skin_mask(np.clip(lab_to_rgb(body_arr), 0, 255).astype(np.uint8)[None])[0].mean() >= 0.5:
        kind = "skin"
    return ColourModel(
        g_centres.astype(np.float32), g_weights, body_arr.astype(np.float32).reshape(-1, 3), kind
    )


def colours_from_masks(lab: FloatImage, garment: Mask, body: Mask) -> ColourModel:
    """A colour model from known garment and body masks (caller- or model-supplied)."""
    g_centres, g_weights, _ = kmeans(_subsample(lab[erode(garment, 1) & garment], 5000), 4)
    keep = g_weights >= 0.05
    g_centres, g_weights = g_centres[keep], g_weights[keep]
    g_weights = (g_weights / max(float(g_weights.sum()), 1e-6)).astype(np.float32)
    b_samples = _subsample(lab[body], 5000, seed=1)
    b_centres, b_weights, _ = kmeans(b_samples, 3, seed=1)
    b_centres = b_centres[b_weights >= 0.05]
    return ColourModel(g_centres, g_weights, b_centres, "supplied" if len(b_centres) else "none")


def _label_body(lab: FloatImage, fg: Mask, colours: ColourModel) -> Mask:
    """Nearest-centre labels inside the silhouette; mixed edge pixels vote by neighbourhood."""
    if len(colours.body) == 0:
        return np.zeros_like(fg)
    if len(colours.garment) == 0:
        return fg.copy()
    centres = np.concatenate([colours.garment, colours.body])
    n_garment = len(colours.garment)
    inner = erode(fg, 2)
    px = lab[inner]
    best = np.full(len(px), np.inf, np.float32)
    label = np.zeros(len(px), np.intp)
    for i, c in enumerate(centres):
        d = ((px - c) ** 2).sum(1)
        better = d < best
        best[better] = d[better]
        label[better] = i
    body_inner = np.zeros_like(fg)
    body_inner[inner] = label >= n_garment
    body_inner = np.asarray(cv2.medianBlur(body_inner.astype(np.uint8), 5) > 0) & inner
    garment_inner = inner & ~body_inner
    votes_b = np.asarray(cv2.blur(body_inner.astype(np.float32), (7, 7)))
    votes_g = np.asarray(cv2.blur(garment_inner.astype(np.float32), (7, 7)))
    edge = fg & ~inner
    body = body_inner.copy()
    body[edge] = votes_b[edge] > votes_g[edge]
    return body


# --- entry point ---------------------------------------------------------------------------


def segment(
    image: Image.Image | RGBArray,
    *,
    garment_mask: Mask | None = None,
    body_mask: Mask | None = None,
    segmenter: Segmenter | None = None,
) -> Segmentation:
    """Split a studio photo into backdrop, garment and body (mannequin, stand or model).

    Precedence: caller-supplied masks, then ``segmenter``, then the classical analysis. The
    backdrop fit is always computed: compositing and quality checks use its colour surface.
    """
    rgb = as_rgb_array(image)
    h, w = rgb.shape[:2]
    for name, m in (("garment_mask", garment_mask), ("body_mask", body_mask)):
        if m is not None and m.shape != (h, w):
            raise ValueError(f"{name} has shape {m.shape}, image is {(h, w)}")
    lab = rgb_to_lab(rgb)
    fit = fit_backdrop(rgb, lab)
    fg, matte = _foreground(rgb, lab, fit)
    area = h * w

    source: Literal["classical", "model", "supplied"] = "classical"
    if garment_mask is not None:
        garment = np.asarray(garment_mask, bool)
        body = np.asarray(body_mask, bool) & ~garment if body_mask is not None else fg & ~garment
        source = "supplied"
    elif body_mask is not None:
        body = np.asarray(body_mask, bool)
        garment = fg & ~body
        source = "supplied"
    elif segmenter is not None:
        out = segmenter.predict(rgb)
        garment = np.asarray(out.garment, np.float32) >= 0.5
        if out.body is not None:
            body = (np.asarray(out.body, np.float32) >= 0.5) & ~garment
        else:
            body = fg & ~garment
        source = "model"
    else:
        colours = estimate_colours(lab, fg, rgb)
        body = _label_body(lab, fg, colours)
        body = remove_small(body, max(12, area // 4000))
        garment = fg & ~body
        garment = remove_small(garment, max(16, area // 1000))
        body = fg & ~garment
        return Segmentation(
            ~(garment | body),
            garment,
            body,
            _garment_alpha(matte, garment, body),
            fit.rgb,
            colours,
            source,
        )

    colours = colours_from_masks(lab, garment, body)
    return Segmentation(
        ~(garment | body),
        garment,
        body,
        _garment_alpha(matte, garment, body),
        fit.rgb,
        colours,
        source,
    )


def _garment_alpha(matte: FloatImage, garment: Mask, body: Mask) -> FloatImage:
    """The matte around the garment: 1 inside, fractional on its backdrop edge, 0 elsewhere."""
    alpha = np.where(dilate(garment, 1) & ~body, matte, 0.0).astype(np.float32)
    alpha[garment] = np.maximum(alpha[garment], 0.5)
    alpha[erode(garment, 1)] = 1.0
    return alpha
