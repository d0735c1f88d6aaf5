"""Synthetic ghost-mannequin scenes with known geometry, and a classical test inpainter.

Every scene is drawn from polygons and ellipses, so the ground truth is exact: the backdrop,
garment and body (mannequin, stand or model) masks, and the hidden regions a ghost-mannequin
image must reconstruct — the neck opening with the back of the collar (the waistband's inner
back for trousers), one region per sleeve opening and one per hem opening. The hidden regions
follow the convention of ``workers.pipelines.ghost.igr`` (half-ellipses over each opening) but
with their own proportions, so the tests measure agreement rather than copy constants.

``make_hard_scene`` draws a harder set (``HARD_SCENES``) with the same exact ground truth: models
of every skin tone with hair, garments within a few ΔE of the backdrop or the body, prints in
the backdrop's colour, a floor, crops, an already ghosted garment and a cluttered photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from workers.pipelines.contracts import InpaintRequest, InpaintResult, ProgressCallback
from workers.pipelines.ghost.pipeline import (
    GhostJob,
    GhostParams,
    GhostResult,
    finish_ghost,
    prepare_ghost,
)

Mask = NDArray[np.bool_]
RGB = tuple[int, int, int]
Point = tuple[float, float]

WIDTH, HEIGHT = 360, 480
CX = WIDTH / 2

# Ground-truth proportions of the hidden half-ellipses (minor / major semi-axis).
# The inside of the neck shows within the garment's outline (the studio retoucher's
# convention on real photos): the back of the collar is a thin band at most above the line
# through the collar tips.
NECK_BACK_RATIO = 0.1
WAIST_BACK_RATIO = 0.15
SLEEVE_RATIO = 0.28
TOP_HEM_RATIO = 0.1
LEG_HEM_RATIO = 0.3

BACKDROP_TOP: RGB = (240, 239, 236)
BACKDROP_BOTTOM: RGB = (214, 213, 210)
MANNEQUIN_BEIGE: RGB = (224, 196, 168)
MANNEQUIN_BLACK: RGB = (46, 46, 50)
STAND: RGB = (120, 122, 128)
SKIN: RGB = (206, 158, 128)
HAIR: RGB = (62, 42, 30)
SHOES: RGB = (34, 30, 30)

NAVY: RGB = (32, 48, 96)
RED: RGB = (172, 32, 44)
TEAL: RGB = (28, 118, 128)
BURGUNDY: RGB = (110, 24, 48)
GREEN: RGB = (44, 86, 58)

GarmentKind = Literal["top", "dress", "trousers"]
Wearer = Literal["mannequin", "model", "hanger", "none"]


@dataclass
class Scene:
    """A rendered photo and its ground truth."""

    image: NDArray[np.uint8]
    backdrop: Mask
    garment: Mask
    body: Mask
    neck: Mask
    sleeves: list[Mask]
    hems: list[Mask]
    garment_type: GarmentKind
    wearer: Wearer
    garment_rgb: RGB
    body_rgb: RGB
    extras: dict[str, object] = field(default_factory=dict)

    def pil(self) -> Image.Image:
        """The photo as a PIL RGB image."""
        return Image.fromarray(self.image, "RGB")

    @property
    def sleeve_centres(self) -> list[Point]:
        """Centroids of the sleeve-opening regions."""
        return [centroid(m) for m in self.sleeves]

    @property
    def hem_centres(self) -> list[Point]:
        """Centroids of the hem-opening regions."""
        return [centroid(m) for m in self.hems]

    @property
    def hidden(self) -> Mask:
        """Union of all hidden regions."""
        out = self.neck.copy()
        for m in (*self.sleeves, *self.hems):
            out |= m
        return out


def centroid(mask: Mask) -> Point:
    """(x, y) centre of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def iou(a: Mask, b: Mask) -> float:
    """Intersection over union of two masks (1.0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


# --- drawing primitives -------------------------------------------------------------------


def _blank() -> NDArray[np.uint8]:
    return np.zeros((HEIGHT, WIDTH), np.uint8)


def _poly(points: Sequence[Point]) -> Mask:
    m = _blank()
    cv2.fillPoly(m, [np.round(np.asarray(points) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return m.astype(bool)


def _ellipse(centre: Point, axes: tuple[float, float], angle: float = 0.0) -> Mask:
    m = _blank()
    c = (round(centre[0] * 16), round(centre[1] * 16))
    ax = (round(axes[0] * 16), round(axes[1] * 16))
    cv2.ellipse(m, c, ax, angle, 0, 360, 1, -1, cv2.LINE_8, 4)
    return m.astype(bool)


def _limb(p0: Point, p1: Point, w0: float, w1: float) -> Mask:
    """A tapered limb from p0 (half-width w0) to p1 (half-width w1), round ends."""
    d = np.subtract(p1, p0)
    d = d / np.linalg.norm(d)
    n = np.array([-d[1], d[0]])
    a, b = np.asarray(p0), np.asarray(p1)
    quad = [tuple(a + w0 * n), tuple(b + w1 * n), tuple(b - w1 * n), tuple(a - w0 * n)]
    return _poly(quad) | _ellipse(p0, (w0, w0)) | _ellipse(p1, (w1, w1))


def half_ellipse(centre: Point, along: Point, a: float, b: float) -> Mask:
    """Half of an ellipse on the side ``along`` points to; its major axis is perpendicular.

    ``along`` is the unit normal of the opening's edge line pointing out of the garment (for a
    sleeve, towards the hand); ``a`` is the half-width along the edge, ``b`` the depth.
    """
    out = np.zeros((HEIGHT, WIDTH), bool)
    # Only the box around the centre that can hold the ellipse is evaluated.
    r = math.ceil(math.hypot(a, b)) + 2
    y0, y1 = max(math.floor(centre[1]) - r, 0), min(math.ceil(centre[1]) + r + 1, HEIGHT)
    x0, x1 = max(math.floor(centre[0]) - r, 0), min(math.ceil(centre[0]) + r + 1, WIDTH)
    if y0 >= y1 or x0 >= x1:
        return out
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    nx, ny = along
    ux, uy = ny, -nx
    s = dx * ux + dy * uy
    t = dx * nx + dy * ny
    out[y0:y1, x0:x1] = ((s / a) ** 2 + (t / b) ** 2 <= 1.0) & (t >= 0)
    return out


def _unit(v: Point) -> Point:
    n = math.hypot(*v)
    return v[0] / n, v[1] / n


# --- body parts -----------------------------------------------------------------------------


@dataclass
class _Arm:
    shoulder: Point
    wrist: Point
    side: int  # -1 left, +1 right

    @property
    def direction(self) -> Point:
        return _unit((self.wrist[0] - self.shoulder[0], self.wrist[1] - self.shoulder[1]))

    def at(self, t: float) -> Point:
        d = self.direction
        return self.shoulder[0] + t * d[0], self.shoulder[1] + t * d[1]


def _arms() -> list[_Arm]:
    return [_Arm((CX + s * 63, 128), (CX + s * 118, 292), s) for s in (-1, 1)]


def _upper_body(arms: list[_Arm]) -> dict[str, Mask]:
    torso = _poly(
        [
            (CX - 18, 104),
            (CX - 54, 112),
            (CX - 68, 122),
            (CX - 70, 140),
            (CX - 58, 200),
            (CX - 52, 250),
            (CX - 58, 290),
            (CX - 62, 332),
            (CX + 62, 332),
            (CX + 58, 290),
            (CX + 52, 250),
            (CX + 58, 200),
            (CX + 70, 140),
            (CX + 68, 122),
            (CX + 54, 112),
            (CX + 18, 104),
        ]
    )
    neck = _poly([(CX - 15, 58), (CX + 15, 58), (CX + 17, 112), (CX - 17, 112)])
    head = _ellipse((CX, 42), (24, 31))
    limbs = _blank().astype(bool)
    for arm in arms:
        limbs |= _limb(arm.shoulder, arm.wrist, 14, 10)
        hand_c = arm.at(math.dist(arm.shoulder, arm.wrist) + 12)
        limbs |= _ellipse(hand_c, (9, 15), -arm.side * 12)
    return {"torso": torso, "neck": neck, "head": head, "arms": limbs}


def _stand() -> dict[str, Mask]:
    return {
        "pole": _poly([(CX - 5, 320), (CX + 5, 320), (CX + 5, 462), (CX - 5, 462)]),
        "base": _ellipse((CX, 464), (56, 8)),
    }


def _legs() -> dict[str, Mask]:
    legs = _blank().astype(bool)
    shoes = _blank().astype(bool)
    for s in (-1, 1):
        legs |= _limb((CX + s * 28, 320), (CX + s * 34, 448), 22, 10)
        shoes |= _ellipse((CX + s * 38, 458), (17, 8))
    return {"legs": legs, "shoes": shoes}


# --- garments -------------------------------------------------------------------------------


@dataclass
class _Drawn:
    mask: Mask
    neck: Mask
    sleeves: list[Mask]
    hems: list[Mask]


def _sleeves(arms: list[_Arm], length: float, half_width: float) -> tuple[Mask, list[Mask]]:
    shape = _blank().astype(bool)
    regions = []
    for arm in arms:
        s = arm.side
        d = arm.direction
        out = (d[1] * s, -d[0] * s)  # perpendicular pointing away from the torso
        cuff = arm.at(length)
        cuff_out = (cuff[0] + half_width * out[0], cuff[1] + half_width * out[1])
        cuff_in = (cuff[0] - half_width * out[0], cuff[1] - half_width * out[1])
        shape |= _poly(
            [(CX + s * 40, 104), (CX + s * 82, 112), cuff_out, cuff_in, (CX + s * 56, 170)]
        )
        regions.append(half_ellipse(cuff, d, half_width, SLEEVE_RATIO * half_width))
    return shape, regions


def _neckline(tip_half: float, depth: float, y: float = 100.0) -> tuple[Mask, Mask]:
    """(front opening cut from the garment, ground-truth neck region)."""
    front = half_ellipse((CX, y), (0.0, 1.0), tip_half, depth)
    back = half_ellipse((CX, y), (0.0, -1.0), tip_half, NECK_BACK_RATIO * tip_half)
    return front, front | back


def _top(arms: list[_Arm], *, long_sleeves: bool, neck_depth: float) -> _Drawn:
    hem_y, hem_half = 300.0, 66.0
    body = _poly(
        [
            (CX - 23, 100),
            (CX - 74, 112),
            (CX - 74, 124),
            (CX - 62, 165),
            (CX - hem_half, hem_y),
            (CX + hem_half, hem_y),
            (CX + 62, 165),
            (CX + 74, 124),
            (CX + 74, 112),
            (CX + 23, 100),
        ]
    )
    sleeves, sleeve_regions = _sleeves(
        arms, 160 if long_sleeves else 78, 15 if long_sleeves else 20
    )
    front, neck = _neckline(23, neck_depth)
    hem = half_ellipse((CX, hem_y), (0.0, 1.0), hem_half, TOP_HEM_RATIO * hem_half)
    return _Drawn((body | sleeves) & ~front, neck, sleeve_regions, [hem])


def _dress(arms: list[_Arm]) -> _Drawn:
    hem_y, hem_half = 410.0, 100.0
    body = _poly(
        [
            (CX - 23, 100),
            (CX - 74, 112),
            (CX - 74, 124),
            (CX - 63, 165),
            (CX - 58, 232),
            (CX - hem_half, hem_y),
            (CX + hem_half, hem_y),
            (CX + 58, 232),
            (CX + 63, 165),
            (CX + 74, 124),
            (CX + 74, 112),
            (CX + 23, 100),
        ]
    )
    sleeves, sleeve_regions = _sleeves(arms, 64, 19)
    front, neck = _neckline(23, 22)
    hem = half_ellipse((CX, hem_y), (0.0, 1.0), hem_half, TOP_HEM_RATIO * hem_half)
    return _Drawn((body | sleeves) & ~front, neck, sleeve_regions, [hem])


def _trousers() -> _Drawn:
    waist_y, waist_half, hem_y = 110.0, 62.0, 432.0
    shape = _poly(
        [
            (CX - waist_half, waist_y),
            (CX - 72, 190),
            (CX - 68, hem_y),
            (CX - 12, hem_y),
            (CX, 236),
            (CX + 12, hem_y),
            (CX + 68, hem_y),
            (CX + 72, 190),
            (CX + waist_half, waist_y),
        ]
    )
    neck = half_ellipse((CX, waist_y), (0.0, -1.0), waist_half, WAIST_BACK_RATIO * waist_half)
    hems = [half_ellipse((CX + s * 40, hem_y), (0.0, 1.0), 28, LEG_HEM_RATIO * 28) for s in (-1, 1)]
    return _Drawn(shape, neck, [], hems)


def _lower_form() -> dict[str, Mask]:
    stub = _poly(
        [
            (CX - 50, 66),
            (CX + 50, 66),
            (CX + 60, 112),
            (CX + 70, 190),
            (CX - 70, 190),
            (CX - 60, 112),
        ]
    )
    legs = _blank().astype(bool)
    for s in (-1, 1):
        legs |= _limb((CX + s * 36, 200), (CX + s * 40, 454), 24, 13)
    return {"stub": stub, "legs": legs, "base": _ellipse((CX, 464), (70, 8))}


# --- rendering ------------------------------------------------------------------------------


def _backdrop_pixels(rng: np.random.Generator) -> NDArray[np.float64]:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    t = (ys / (HEIGHT - 1))[..., None]
    top, bottom = np.asarray(BACKDROP_TOP, float), np.asarray(BACKDROP_BOTTOM, float)
    img = top * (1 - t) + bottom * t
    vignette = 7.0 * (((xs - CX) / CX) ** 2)[..., None]
    return np.asarray(img - vignette)


def _shade(mask: Mask, rgb: RGB, *, amp: float, folds: float) -> NDArray[np.float64]:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    if mask.any():
        mx = xs[mask].mean()
        half = max(float(np.ptp(xs[mask])) / 2, 1.0)
    else:
        mx, half = CX, CX
    light = 1.0 + amp * (0.5 - ((xs - mx) / half) ** 2)
    light += folds * np.sin(xs / 9.0 + ys / 23.0)
    return np.asarray(np.asarray(rgb, float) * light[..., None])


def _print(mask: Mask, rgb: RGB, rng: np.random.Generator) -> NDArray[np.bool_]:
    """A random print of small blobs and bars, dense enough for feature matching."""
    canvas = _blank()
    ys, xs = np.nonzero(mask)
    for _ in range(int(mask.sum() / 90)):
        i = int(rng.integers(len(xs)))
        c = (int(xs[i]), int(ys[i]))
        if rng.random() < 0.5:
            ax = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
            cv2.ellipse(canvas, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            d = (int(rng.integers(-8, 9)), int(rng.integers(-8, 9)))
            cv2.line(canvas, c, (c[0] + d[0], c[1] + d[1]), 1, 2)
    return canvas.astype(bool) & mask


def render(
    layers: Sequence[tuple[Mask, RGB, float, float]],
    *,
    seed: int,
    print_rgb: RGB | None = None,
    print_mask: Mask | None = None,
) -> NDArray[np.uint8]:
    """Paint layers (mask, colour, shading amplitude, folds) back to front over the backdrop."""
    rng = np.random.default_rng(seed)
    img = _backdrop_pixels(rng)
    for mask, rgb, amp, folds in layers:
        img[mask] = _shade(mask, rgb, amp=amp, folds=folds)[mask]
    if print_rgb is not None and print_mask is not None:
        dots = _print(print_mask, print_rgb, rng)
        img[dots] = np.asarray(print_rgb, float)
    # A slight optical blur and sensor noise, as in a real studio shot.
    img = np.asarray(cv2.GaussianBlur(img, (0, 0), 0.6), np.float64)
    img += rng.normal(0.0, 2.5, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_scene(
    garment: GarmentKind = "top",
    *,
    wearer: Wearer = "mannequin",
    garment_rgb: RGB = NAVY,
    mannequin_rgb: RGB = MANNEQUIN_BEIGE,
    long_sleeves: bool = False,
    neck_depth: float = 30.0,
    textured: bool = False,
    seed: int = 0,
) -> Scene:
    """Draw one scene; ``wearer='model'`` dresses a person with skin, hair and shoes."""
    arms = _arms()
    body_layers: list[tuple[Mask, RGB, float, float]] = []
    body_rgb = SKIN if wearer == "model" else mannequin_rgb
    if garment == "trousers":
        form = _lower_form()
        body_layers = [
            (form["base"], STAND, 0.1, 0.0),
            (form["legs"], mannequin_rgb, 0.18, 0.0),
            (form["stub"], mannequin_rgb, 0.18, 0.0),
        ]
        drawn = _trousers()
    else:
        upper = _upper_body(arms)
        if wearer == "model":
            hair = _ellipse((CX, 34), (27, 26)) & ~_ellipse((CX, 52), (22, 24))
            legs = _legs()
            body_layers = [
                (legs["legs"], SKIN, 0.2, 0.0),
                (legs["shoes"], SHOES, 0.1, 0.0),
                (upper["torso"] | upper["neck"] | upper["arms"], SKIN, 0.2, 0.0),
                (upper["head"], SKIN, 0.2, 0.0),
                (hair, HAIR, 0.1, 0.0),
            ]
        else:
            stand = _stand()
            body_layers = [
                (stand["base"], STAND, 0.1, 0.0),
                (stand["pole"], STAND, 0.1, 0.0),
                (upper["torso"] | upper["neck"] | upper["arms"], mannequin_rgb, 0.18, 0.0),
                (upper["head"], mannequin_rgb, 0.18, 0.0),
            ]
        if garment == "dress":
            drawn = _dress(arms)
        else:
            drawn = _top(arms, long_sleeves=long_sleeves, neck_depth=neck_depth)
    body = _blank().astype(bool)
    for m, *_ in body_layers:
        body |= m
    body &= ~drawn.mask
    layers = [*body_layers, (drawn.mask, garment_rgb, 0.22, 0.05)]
    print_rgb = _contrast(garment_rgb) if textured else None
    image = render(layers, seed=seed, print_rgb=print_rgb, print_mask=drawn.mask)
    return Scene(
        image=image,
        backdrop=~(body | drawn.mask),
        garment=drawn.mask,
        body=body,
        # Hidden regions are where the garment is not visible: its own pixels are excluded.
        neck=drawn.neck & ~drawn.mask,
        sleeves=[m & ~drawn.mask for m in drawn.sleeves],
        hems=[m & ~drawn.mask for m in drawn.hems],
        garment_type=garment,
        wearer=wearer,
        garment_rgb=garment_rgb,
        body_rgb=body_rgb,
    )


def _contrast(rgb: RGB) -> RGB:
    r, g, b = rgb
    return (min(255, r + 150), min(255, g + 140), min(255, b + 90))


# --- neck-joint pair ------------------------------------------------------------------------


@dataclass
class InteriorPair:
    """A main photo, an interior shot of the neck area, and the true interior→main mapping."""

    scene: Scene
    interior: NDArray[np.uint8]
    interior_to_main: NDArray[np.float64]  # 3x3 homography
    label: Mask  # where the interior's label lands in the main image


def make_interior_pair(
    *,
    textured: bool = True,
    warp: NDArray[np.float64] | None = None,
    size: tuple[int, int] = (200, 180),
    seed: int = 3,
) -> InteriorPair:
    """A second shot of the neck area with the garment's interior showing, and its true warp.

    The interior shot is what a studio takes with the mannequin's neck piece removed: the same
    garment around the neck and, through the opening, the inner back of the collar (a darker
    shade of the garment) with a woven label. ``warp`` maps coordinates of the 180x150 crop at
    (90, 40) of the main photo to interior-photo coordinates (default: 7° rotation, 1.12 scale,
    a shift and slight perspective).
    """
    scene = make_scene("top", textured=textured, garment_rgb=NAVY, seed=seed)
    x0, y0 = 90, 40
    rng = np.random.default_rng(seed + 1)
    shot = scene.image.astype(np.float64)
    inner = np.asarray(scene.garment_rgb, float) * 0.7
    shot[scene.neck] = inner + rng.normal(0, 2.0, (int(scene.neck.sum()), 3))
    label = np.zeros(scene.neck.shape, bool)
    label[96:108, 168:193] = True
    label &= scene.neck
    shot[label] = (235, 232, 220)
    if warp is None:
        angle = math.radians(7.0)
        sc = 1.12
        warp = np.array(
            [
                [sc * math.cos(angle), -sc * math.sin(angle), 18.0],
                [sc * math.sin(angle), sc * math.cos(angle), 6.0],
                [0.00012, -0.00008, 1.0],
            ]
        )
    shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    main_to_interior = warp @ np.linalg.inv(shift)
    interior = cv2.warpPerspective(
        np.clip(shot, 0, 255).astype(np.uint8), main_to_interior, size, flags=cv2.INTER_LINEAR
    )
    to_main = np.linalg.inv(main_to_interior)
    return InteriorPair(scene, np.asarray(interior), to_main / to_main[2, 2], label)


# --- classical test inpainter ---------------------------------------------------------------


class DiffusionTestInpainter:
    """A deterministic, weight-free stand-in for the SDXL inpainter, for tests only.

    Each "denoising step" diffuses the surrounding garment one Gaussian pass into the masked
    area (pixels coloured like the crop's border, i.e. the backdrop, are not sources), so the
    fill carries the garment's own colours across the seam. The seed adds a faint,
    reproducible grain so that different seeds give different images. Records the requests
    and the steps it ran.
    """

    def __init__(self, *, gpu_seconds_per_step: float = 0.001) -> None:
        self.requests: list[InpaintRequest] = []
        self.steps_run = 0
        self.gpu_seconds_per_step = gpu_seconds_per_step

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        """Diffuse the surrounding garment into the mask, one pass per step."""
        self.requests.append(request)
        img = np.asarray(request.image.convert("RGB"), np.float32).copy()
        mask = np.asarray(request.mask.convert("L")) > 127
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        backdrop = np.median(border, axis=0)
        source = ~mask & (np.linalg.norm(img - backdrop, axis=2) > 30.0)
        weight = (mask | source).astype(np.float32)
        den = np.maximum(cv2.GaussianBlur(weight, (0, 0), 1.5), 1e-6)[..., None]
        rng = np.random.default_rng(request.seed)
        img[mask] += rng.normal(0.0, 1.5, (int(mask.sum()), 3)).astype(np.float32)
        for step in range(1, request.steps + 1):
            blurred = cv2.GaussianBlur(img * weight[..., None], (0, 0), 1.5) / den
            img[mask] = blurred[mask]
            self.steps_run += 1
            if progress is not None:
                progress(step, request.steps)
        out = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
        return InpaintResult(out, self.gpu_seconds_per_step * request.steps)

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]:
        """Run the requests one after the other."""
        return [self.inpaint(r, progress) for r in requests]


class FlatFillTestInpainter(DiffusionTestInpainter):
    """A deliberately bad test inpainter: fills the mask with flat magenta (a visible seam)."""

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        """Fill the mask with flat magenta."""
        self.requests.append(request)
        img = np.asarray(request.image.convert("RGB")).copy()
        mask = np.asarray(request.mask.convert("L")) > 127
        img[mask] = (230, 0, 200)
        if progress is not None:
            progress(request.steps, request.steps)
        return InpaintResult(Image.fromarray(img, "RGB"), 0.0)


# --- hard scenes ----------------------------------------------------------------------------
#
# Scenes built to defeat naive colour clustering, still with exact ground truth: skin of every
# tone with soft shading, hair over the shoulders, garments within a few ΔE of the backdrop or
# of the body, prints coloured like the backdrop, a floor, garments crossing the frame, a
# ghost image with no body, and a cluttered non-studio photo that should be refused.
#
# Each scene is drawn from nominal geometry that a small seeded affine jitter moves, scales and
# rotates (masks are warped with nearest-neighbour sampling, all with the same map, so the
# ground truth stays a partition); colours, folds, hair and skin tone vary with the seed too.
# "Body" is everything in the photo that is neither the product nor the backdrop: the
# mannequin and its stand, or the model's skin, hair, face, other clothes and shoes, or the
# hanger.

HARD_SCENES: tuple[str, ...] = (
    "model-skin-tones",
    "model-white-top",
    "model-skin-dress",
    "printed-logo",
    "floor-corner",
    "frame-crossing",
    "cream-on-cream",
    "white-on-white",
    "ghost-already",
    "busy-scene",
)

HARD_SCENE_NOTES: dict[str, str] = {
    "model-skin-tones": "model, skin tone light to dark by seed, dark or blond hair on the "
    "shoulders, coloured tee, trousers",
    "model-white-top": "off-white tee on a light-skinned model on a white backdrop "
    "(garment-backdrop ΔE 5-10)",
    "model-skin-dress": "beige dress within ΔE 10-15 of the model's skin, bare arms and legs, "
    "heels",
    "printed-logo": "dark tee on a mannequin with a backdrop-coloured logo, chest band and "
    "stripes that meet the silhouette edge",
    "floor-corner": "dress on a mannequin in a wall-and-floor studio: gradient wall, horizon at "
    "75-85% height, floor, contact and wall shadows",
    "frame-crossing": "close crop of a long-sleeve top: sleeves leave the frame left and right, "
    "the hem leaves the bottom (only the neck opening is in frame)",
    "cream-on-cream": "cream tee on a cream mannequin (ΔE 8-12) with rib collar, seams and "
    "contact shadows",
    "white-on-white": "white shirt with collar and placket on a glossy white mannequin on a "
    "light backdrop",
    "ghost-already": "an already ghosted tee: no body, the inner back of the collar, sleeves "
    "and hem show darker",
    "busy-scene": "a garment on a hanger in a cluttered shop; not a studio photo, to be refused",
}

SKIN_TONES: tuple[RGB, ...] = (
    (238, 200, 176),
    (216, 168, 136),
    (192, 140, 104),
    (154, 104, 72),
    (110, 72, 50),
    (72, 48, 38),
)
HAIR_DARK: RGB = (44, 32, 26)
HAIR_BROWN: RGB = (92, 62, 42)
HAIR_BLOND: RGB = (206, 172, 116)
MANNEQUIN_WHITE: RGB = (232, 232, 230)

_GARMENT, _BODY = 1, 2
Painter = NDArray[np.float32]


def to_lab(rgb: Sequence[float] | NDArray[np.floating] | NDArray[np.uint8]) -> NDArray[np.float32]:
    """CIE Lab (L in 0..100) of RGB colours in 0..255, keeping the input's shape."""
    arr = np.asarray(rgb, np.float32)
    flat = np.clip(arr.reshape(-1, 1, 3) / 255.0, 0.0, 1.0)
    return np.asarray(cv2.cvtColor(flat, cv2.COLOR_RGB2Lab), np.float32).reshape(arr.shape)


def from_lab(lab: Sequence[float] | NDArray[np.floating]) -> RGB:
    """The RGB colour (0..255) of one CIE Lab colour."""
    arr = np.asarray(lab, np.float32).reshape(1, 1, 3)
    rgb = np.asarray(cv2.cvtColor(arr, cv2.COLOR_Lab2RGB)).reshape(3)
    r, g, b = (int(v) for v in np.clip(np.round(rgb * 255.0), 0, 255))
    return r, g, b


def delta_e(a: Sequence[float], b: Sequence[float]) -> float:
    """CIE76 ΔE between two RGB colours."""
    return float(np.linalg.norm(to_lab(a) - to_lab(b)))


def median_rgb(image: NDArray[np.uint8], mask: Mask) -> tuple[float, float, float]:
    """Per-channel median of an image's pixels under a mask."""
    r, g, b = (float(v) for v in np.median(image[mask].astype(np.float32), axis=0))
    return r, g, b


def skin_tone(t: float) -> RGB:
    """A photographed skin colour from lightest (t=0) to darkest (t=1)."""
    t = min(max(t, 0.0), 1.0) * (len(SKIN_TONES) - 1)
    i = min(int(t), len(SKIN_TONES) - 2)
    f = t - i
    a, b = np.asarray(SKIN_TONES[i], float), np.asarray(SKIN_TONES[i + 1], float)
    r, g, bl = (round(float(v)) for v in a * (1 - f) + b * f)
    return r, g, bl


_COORDS: list[tuple[NDArray[np.float32], NDArray[np.float32]]] = []


def _coords() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Read-only (ys, xs) pixel coordinate grids."""
    if not _COORDS:
        ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        ys.flags.writeable = False
        xs.flags.writeable = False
        _COORDS.append((ys, xs))
    return _COORDS[0]


def _jit(rng: np.random.Generator, rgb: RGB, amount: float) -> RGB:
    """A colour moved by up to ``amount`` in each Lab coordinate."""
    return from_lab(to_lab(rgb) + rng.uniform(-amount, amount, 3))


def _scaled(rgb: RGB, f: float) -> RGB:
    r, g, b = (int(min(255.0, c * f)) for c in rgb)
    return r, g, b


def _round(mask: Mask, depth: float) -> NDArray[np.float32]:
    """0 at a part's edge rising to 1 at ``depth`` px inside: the shading of a rounded form."""
    if not mask.size:
        return np.zeros(mask.shape, np.float32)
    dt = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.asarray(np.sqrt(np.clip(dt / depth, 0.0, 1.0)), np.float32)


def _affine(
    rng: np.random.Generator,
    *,
    shift: tuple[float, float] = (8.0, 5.0),
    scale: float = 0.035,
    angle: float = 1.5,
    base: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    """A 3x3 jitter (rotation and scale about the frame centre, then a shift) after ``base``."""
    s = 1.0 + rng.uniform(-scale, scale)
    th = math.radians(rng.uniform(-angle, angle))
    tx, ty = rng.uniform(-shift[0], shift[0]), rng.uniform(-shift[1], shift[1])
    cx, cy = CX, HEIGHT / 2
    c, si = s * math.cos(th), s * math.sin(th)
    jitter = np.array(
        [[c, -si, cx + tx - c * cx + si * cy], [si, c, cy + ty - si * cx - c * cy], [0, 0, 1]]
    )
    return jitter @ base if base is not None else jitter


class _Warp:
    """Applies one affine map to nominal masks (nearest neighbour, so partitions stay exact)."""

    def __init__(self, matrix: NDArray[np.float64]) -> None:
        self.matrix = matrix

    def __call__(self, mask: Mask, *, replicate: bool = True) -> Mask:
        border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
        out = cv2.warpAffine(
            mask.astype(np.uint8),
            self.matrix[:2],
            (WIDTH, HEIGHT),
            flags=cv2.INTER_NEAREST,
            borderMode=border,
            borderValue=0,
        )
        return np.asarray(out, bool)

    def point(self, p: Point) -> Point:
        x, y, _ = self.matrix @ np.array([p[0], p[1], 1.0])
        return float(x), float(y)


@dataclass
class _Paint:
    """Colours over a box of the frame (``sl``), to be used under a layer's mask."""

    sl: tuple[slice, slice]
    rgb: NDArray[np.float32]

    def times(self, field: NDArray[np.float32]) -> _Paint:
        """Multiply by a full-frame (H, W) field, in place."""
        self.rgb *= field[self.sl][..., None]
        return self


def _box(mask: Mask, pad: int = 2) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    return (
        slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + pad + 1, HEIGHT)),
        slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + pad + 1, WIDTH)),
    )


class _Studio:
    """A scene's random state, shared shading fields and the canvas layers are painted on.

    Painters compute colours only over the bounding box of a layer's mask, which keeps a
    scene within a few tens of milliseconds.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.light = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.07))
        _, xs = _coords()
        self.side = np.asarray((xs - CX) / CX, np.float32)  # -1 .. 1 across the frame
        self.grain = rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)
        self.fine = self.smooth((12, 9), 1.0)
        self.coarse = self.smooth((4, 3), 1.0)
        self.folds = self._fold_field()
        self._streaks: NDArray[np.float32] | None = None
        self.img = np.zeros((HEIGHT, WIDTH, 3), np.float32)
        self.kind = np.zeros((HEIGHT, WIDTH), np.uint8)
        self.tags: dict[str, Mask] = {}

    # fields

    def smooth(self, cells: tuple[int, int], amp: float) -> NDArray[np.float32]:
        """Smooth random variation: a (rows, cols) grid of normal values, bicubically enlarged."""
        small = self.rng.standard_normal(cells, dtype=np.float32)
        return np.asarray(
            cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC) * amp, np.float32
        )

    def _fold_field(self) -> NDArray[np.float32]:
        """Drape folds: mostly vertical ridges with a patchy envelope, roughly in -1..1."""
        ys, xs = _coords()
        acc = np.zeros((HEIGHT, WIDTH), np.float32)
        for i in range(3):
            th = self.rng.uniform(-0.35, 0.35)
            lam = self.rng.uniform(14.0, 38.0)
            phase = self.rng.uniform(0, 2 * math.pi)
            env = np.clip(0.55 + 0.5 * (self.coarse if i % 2 else -self.coarse), 0.0, 1.0)
            wave = np.sin((xs * math.cos(th) + ys * math.sin(th)) * (2 * math.pi / lam) + phase)
            acc += env * np.sign(wave) * np.abs(wave) ** 0.7
        return acc / 1.8

    def _blotch(self, sl: tuple[slice, slice], amp: float) -> NDArray[np.float32]:
        """Smooth variation over a box: a random mix of the shared fine and coarse fields."""
        a, b = self.rng.uniform(-1.0, 1.0, 2)
        return np.asarray(amp * (a * self.fine[sl] + b * 0.5 * self.coarse[sl]), np.float32)

    # painters

    def studio(self, top: RGB, bottom: RGB, *, vignette: float = 7.0) -> NDArray[np.float32]:
        """A seamless paper backdrop: vertical gradient, fall-off to the sides, faint blotches."""
        t = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None, None]
        rows = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
        spot = self.rng.uniform(-0.4, 0.4)
        falloff = vignette * (self.side - spot) ** 2 + 1.2 * self.coarse
        return np.asarray(rows - falloff[..., None], np.float32)

    def cloth(
        self,
        mask: Mask,
        rgb: RGB,
        *,
        roundness: float = 0.16,
        depth: float = 22.0,
        folds: float = 0.05,
        grain: float = 1.0,
    ) -> _Paint:
        """Fabric: darker where it turns away at the edges, drape folds, a faint weave grain."""
        sl = _box(mask)
        f = 1.0 - roundness * (1.0 - _round(mask[sl], depth))
        f += self.light * self.side[sl] + folds * self.folds[sl] + self._blotch(sl, 0.02)
        out = np.asarray(rgb, np.float32) * f[..., None] + (grain * self.grain[sl])[..., None]
        return _Paint(sl, np.asarray(out, np.float32))

    def skin(self, mask: Mask, rgb: RGB, *, depth: float = 9.0) -> _Paint:
        """Skin: soft rounded shading, warmer in the shadows, blotchy tone and a little noise."""
        sl = _box(mask)
        r = _round(mask[sl], depth)
        f = 0.74 + 0.3 * r + self.light * self.side[sl] + self._blotch(sl, 0.025)
        out = np.asarray(rgb, np.float32) * f[..., None]
        out *= 1.0 - (1.0 - r)[..., None] * np.array([0.0, 0.05, 0.08], np.float32)
        out[..., 1] *= 1.0 - self._blotch(sl, 0.015)
        return _Paint(sl, np.asarray(out + (1.6 * self.grain[sl])[..., None], np.float32))

    def hair(self, mask: Mask, rgb: RGB) -> _Paint:
        """Hair: strands (vertical streaks), darker at the edges."""
        if self._streaks is None:
            small = self.rng.standard_normal((10, WIDTH // 2), dtype=np.float32)
            self._streaks = np.asarray(
                cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR), np.float32
            )
        sl = _box(mask)
        f = 0.7 + 0.3 * _round(mask[sl], 7) + 0.14 * self._streaks[sl] + self.light * self.side[sl]
        return _Paint(sl, np.asarray(np.asarray(rgb, np.float32) * f[..., None], np.float32))

    def form(self, mask: Mask, rgb: RGB, *, depth: float = 16.0, gloss: float = 0.0) -> _Paint:
        """A mannequin part or a stand: rounded shading, a highlight along the ridge if glossy."""
        sl = _box(mask)
        r = _round(mask[sl], depth)
        f = 0.8 + 0.22 * r + self.light * self.side[sl] + self._blotch(sl, 0.01)
        r2 = r * r
        r8 = (r2 * r2) ** 2
        out = np.asarray(rgb, np.float32) * f[..., None] + (gloss * r8)[..., None]
        return _Paint(sl, np.asarray(out, np.float32))

    def flat(self, mask: Mask, rgb: RGB) -> _Paint:
        """A plain colour."""
        sl = _box(mask)
        shape = (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start, 3)
        return _Paint(sl, np.broadcast_to(np.asarray(rgb, np.float32), shape).copy())

    # canvas

    def fill(self, colours: NDArray[np.float32]) -> None:
        """Paint the whole frame as backdrop."""
        self.img[...] = colours

    def add(self, mask: Mask, kind: int, paint: _Paint, *tags: str) -> None:
        """Paint a layer over what is there; ``tags`` name extras masks the layer belongs to."""
        sl = paint.sl
        inside = mask[sl]
        if np.count_nonzero(inside) != np.count_nonzero(mask):
            raise ValueError("the paint does not cover the layer's mask")
        np.copyto(self.img[sl], paint.rgb, where=inside[..., None])
        np.copyto(self.kind[sl], np.uint8(kind), where=inside)
        for tag, m in self.tags.items():
            if tag not in tags:
                m[sl] &= ~inside
        for tag in tags:
            self.tags.setdefault(tag, np.zeros_like(mask))[sl] |= inside

    def darken(self, amount: NDArray[np.float32], where: Mask | None = None) -> None:
        """Multiply what is painted by (1 - amount) (shadows), optionally only under a mask."""
        f = 1.0 - amount
        if where is not None:
            f = np.where(where, f, 1.0).astype(np.float32)
        self.img *= f[..., None]

    def photo(self, noise: float = 2.5) -> NDArray[np.uint8]:
        """A slight optical blur and sensor noise, as in ``render``."""
        img = np.asarray(cv2.GaussianBlur(self.img, (0, 0), 0.6), np.float32)
        img += noise * self.rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _hard_scene(
    studio: _Studio,
    *,
    name: str,
    seed: int,
    warp: _Warp,
    drawn: _Drawn | None,
    garment_type: GarmentKind,
    wearer: Wearer,
    garment_rgb: RGB,
    body_rgb: RGB,
    extras: dict[str, object],
) -> Scene:
    image = studio.photo(noise=float(studio.rng.uniform(2.0, 3.2)))
    garment = studio.kind == _GARMENT
    body = studio.kind == _BODY
    empty = np.zeros_like(garment)

    def hidden(m: Mask) -> Mask:
        return np.asarray(warp(m, replicate=False) & ~garment)

    neck = hidden(drawn.neck) if drawn is not None else empty
    sleeves = [hidden(m) for m in drawn.sleeves] if drawn is not None else []
    hems = [hidden(m) for m in drawn.hems] if drawn is not None else []
    info: dict[str, object] = {"name": name, "seed": seed, "refuse": False}
    info.update({tag: m.copy() for tag, m in studio.tags.items() if m.any()})
    info.update(extras)
    return Scene(
        image=image,
        backdrop=studio.kind == 0,
        garment=garment,
        body=body,
        neck=neck,
        # An opening outside the frame (or nearly) has no hidden region in the photo.
        sleeves=[m for m in sleeves if m.sum() >= 20],
        hems=[m for m in hems if m.sum() >= 20],
        garment_type=garment_type,
        wearer=wearer,
        garment_rgb=garment_rgb,
        body_rgb=body_rgb,
        extras=info,
    )


# --- hard scenes: bodies --------------------------------------------------------------------


def _posed_arms(rng: np.random.Generator) -> list[_Arm]:
    out = []
    for s in (-1, 1):
        wrist = (CX + s * (118 + rng.uniform(-8, 6)), 292 + rng.uniform(-6, 6))
        out.append(_Arm((CX + s * 63, 128), wrist, s))
    return out


def _hair_shape(style: str) -> tuple[Mask, Mask]:
    """(cap around the head, locks falling on the shoulders) for 'long' or 'bun' hair."""
    cap = _ellipse((CX, 38), (28, 31)) & ~_ellipse((CX, 52), (23, 28))
    locks = _blank().astype(bool)
    if style == "long":
        for s in (-1, 1):
            locks |= _poly(
                [
                    (CX + s * 19, 40),
                    (CX + s * 29, 26),
                    (CX + s * 35, 66),
                    (CX + s * 42, 100),
                    (CX + s * 56, 134),
                    (CX + s * 43, 142),
                    (CX + s * 29, 114),
                    (CX + s * 22, 80),
                ]
            )
        locks &= ~cap
    else:
        cap |= _ellipse((CX, 12), (13, 10))
    return cap, locks


def _face(studio: _Studio, warp: _Warp, skin_rgb: RGB, hair_rgb: RGB) -> None:
    brow_rgb = _scaled(hair_rgb, 0.55) if sum(hair_rgb) > 300 else hair_rgb
    lips_rgb = (int(skin_rgb[0] * 0.82), int(skin_rgb[1] * 0.55), int(skin_rgb[2] * 0.58))
    for s in (-1, 1):
        brow = warp(_ellipse((CX + s * 9, 33), (6, 1.6), s * 6))
        studio.add(brow, _BODY, studio.flat(brow, brow_rgb), "face")
        eye = warp(_ellipse((CX + s * 9, 40), (3.5, 2.0)))
        studio.add(eye, _BODY, studio.flat(eye, (52, 40, 38)), "face")
    lips = warp(_ellipse((CX, 61), (7, 2.6)))
    studio.add(lips, _BODY, studio.flat(lips, lips_rgb), "face")


def _model(
    studio: _Studio,
    warp: _Warp,
    arms: list[_Arm],
    *,
    skin_rgb: RGB,
    hair_rgb: RGB,
    hair_style: str,
    shoes_rgb: RGB,
    trousers_rgb: RGB | None,
) -> Mask:
    """Paint a person (behind the garment); returns the hair locks to paint over it."""
    upper = _upper_body(arms)
    legs_shoes = _legs()
    legs, shoes = warp(legs_shoes["legs"]), warp(legs_shoes["shoes"])
    studio.add(legs, _BODY, studio.skin(legs, skin_rgb), "skin")
    studio.add(shoes, _BODY, studio.form(shoes, shoes_rgb, depth=5, gloss=30.0), "shoes")
    ys, _ = _coords()
    chin = warp.point((CX, 74))[1]
    chin_shadow = 1.0 - 0.16 * np.clip(1.0 - (ys - chin) / 14.0, 0.0, 1.0)
    for part in ("torso", "neck", "arms", "head"):
        m = warp(upper[part])
        paint = studio.skin(m, skin_rgb, depth=14.0 if part in ("torso", "head") else 8.0)
        if part == "neck":
            paint.times(np.asarray(chin_shadow, np.float32))
        studio.add(m, _BODY, paint, "skin")
    if trousers_rgb is not None:
        trousers = warp(
            _poly(
                [
                    (CX - 58, 284),
                    (CX - 66, 340),
                    (CX - 64, 452),
                    (CX - 10, 452),
                    (CX, 352),
                    (CX + 10, 452),
                    (CX + 64, 452),
                    (CX + 66, 340),
                    (CX + 58, 284),
                ]
            )
        )
        paint = studio.cloth(trousers, trousers_rgb, folds=0.04, grain=2.5)
        studio.add(trousers, _BODY, paint, "trousers")
    _face(studio, warp, skin_rgb, hair_rgb)
    cap, locks = _hair_shape(hair_style)
    cap = warp(cap)
    studio.add(cap, _BODY, studio.hair(cap, hair_rgb), "hair")
    return warp(locks)


def _mannequin(
    studio: _Studio, warp: _Warp, arms: list[_Arm], rgb: RGB, *, gloss: float = 0.0
) -> None:
    """Paint a mannequin with arms on a stand."""
    upper = _upper_body(arms)
    stand = _stand()
    for part in ("base", "pole"):
        m = warp(stand[part])
        studio.add(m, _BODY, studio.form(m, STAND, depth=4, gloss=40.0), "stand")
    for part in ("torso", "neck", "arms", "head"):
        m = warp(upper[part])
        studio.add(m, _BODY, studio.form(m, rgb, gloss=gloss), "mannequin")


# --- hard scenes: garments ------------------------------------------------------------------


def _shaped_dress(
    arms: list[_Arm], *, hem_y: float, hem_half: float, sleeve_len: float, sleeve_half: float
) -> _Drawn:
    body = _poly(
        [
            (CX - 23, 100),
            (CX - 72, 112),
            (CX - 74, 124),
            (CX - 66, 165),
            (CX - 56, 232),
            (CX - hem_half, hem_y),
            (CX + hem_half, hem_y),
            (CX + 56, 232),
            (CX + 66, 165),
            (CX + 74, 124),
            (CX + 72, 112),
            (CX + 23, 100),
        ]
    )
    sleeves, sleeve_regions = _sleeves(arms, sleeve_len, sleeve_half)
    front, neck = _neckline(23, 26)
    hem = half_ellipse((CX, hem_y), (0.0, 1.0), hem_half, TOP_HEM_RATIO * hem_half)
    return _Drawn((body | sleeves) & ~front, neck, sleeve_regions, [hem])


def _garment(studio: _Studio, warp: _Warp, drawn: _Drawn, rgb: RGB, **cloth: float) -> Mask:
    m = warp(drawn.mask)
    studio.add(m, _GARMENT, studio.cloth(m, rgb, **cloth))
    return m


COAT_COLOURS: tuple[RGB, ...] = (
    (214, 92, 74),
    (222, 176, 52),
    (46, 128, 132),
    (150, 120, 180),
    (112, 122, 60),
    (196, 40, 56),
    (60, 96, 170),
)


def _pick(rng: np.random.Generator, colours: Sequence[RGB], index: int, amount: float = 4.0) -> RGB:
    """The palette's colour at ``index`` (cyclic, so consecutive seeds differ), jittered."""
    return _jit(rng, colours[index % len(colours)], amount)


# --- hard scenes: the set -------------------------------------------------------------------


def _model_top(name: str, seed: int, rng: np.random.Generator, *, white: bool) -> Scene:
    studio = _Studio(rng)
    if white:
        backdrop = _jit(rng, (243, 243, 241), 1.0), _jit(rng, (231, 231, 229), 1.0)
        skin_rgb = skin_tone(rng.uniform(0.0, 0.2))
        # Off-white, warmer and brighter than the paper: ΔE about 5-10 once shaded.
        lift = np.array([rng.uniform(1, 3), 0.5, rng.uniform(5, 7)])
        garment_rgb = from_lab(to_lab(backdrop[0]) + lift)
        hair_rgb = HAIR_BLOND if seed % 2 else HAIR_BROWN
        trousers_rgb = _jit(rng, (58, 74, 108), 3)
    else:
        backdrop = _jit(rng, (226, 226, 226), 2.0), _jit(rng, (204, 204, 203), 2.0)
        skin_rgb = skin_tone((seed * 0.618034) % 1.0 + rng.uniform(-0.04, 0.04))
        garment_rgb = _pick(rng, COAT_COLOURS, seed)
        hair_rgb = HAIR_BLOND if seed % 2 else HAIR_DARK
        trousers_rgb = _pick(rng, [(58, 74, 108), (30, 30, 34), (150, 132, 100)], seed, 3)
    hair_rgb = _jit(rng, hair_rgb, 3)
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(*backdrop, vignette=5.0))
    arms = _posed_arms(rng)
    locks = _model(
        studio,
        warp,
        arms,
        skin_rgb=skin_rgb,
        hair_rgb=hair_rgb,
        hair_style="long",
        shoes_rgb=_pick(rng, [(236, 236, 232), SHOES], seed // 2, 2),
        trousers_rgb=trousers_rgb,
    )
    drawn = _top(arms, long_sleeves=False, neck_depth=float(rng.uniform(22, 34)))
    _garment(studio, warp, drawn, garment_rgb, folds=0.035 if white else 0.05)
    studio.add(locks, _BODY, studio.hair(locks, hair_rgb), "hair")
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="top",
        wearer="model",
        garment_rgb=garment_rgb,
        body_rgb=skin_rgb,
        extras={"skin_rgb": skin_rgb, "hair_rgb": hair_rgb, "backdrop_rgb": backdrop},
    )


def _model_skin_dress(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    backdrop = _jit(rng, (238, 238, 237), 1.5), _jit(rng, (222, 222, 220), 1.5)
    skin_rgb = skin_tone(rng.uniform(0.05, 0.3))
    # Beige, a little lighter, less red and yellower than the skin: ΔE 10-15 once shaded.
    shift = np.array([rng.uniform(5, 7), rng.uniform(-10, -8), rng.uniform(5, 8)])
    garment_rgb = from_lab(to_lab(skin_rgb) + shift)
    hair_rgb = _jit(rng, HAIR_BROWN if seed % 2 else HAIR_DARK, 3)
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(*backdrop))
    arms = _posed_arms(rng)
    _model(
        studio,
        warp,
        arms,
        skin_rgb=skin_rgb,
        hair_rgb=hair_rgb,
        hair_style="bun",
        shoes_rgb=_pick(rng, [(96, 30, 40), (30, 28, 28), (200, 170, 130)], seed),
        trousers_rgb=None,
    )
    drawn = _shaped_dress(
        arms,
        hem_y=float(rng.uniform(350, 372)),
        hem_half=float(rng.uniform(66, 74)),
        sleeve_len=float(rng.uniform(44, 54)),
        sleeve_half=18.0,
    )
    _garment(studio, warp, drawn, garment_rgb, folds=0.04)
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="dress",
        wearer="model",
        garment_rgb=garment_rgb,
        body_rgb=skin_rgb,
        extras={"skin_rgb": skin_rgb, "hair_rgb": hair_rgb, "backdrop_rgb": backdrop},
    )


def _printed_logo(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    top_rgb, bottom_rgb = _jit(rng, BACKDROP_TOP, 1.5), _jit(rng, BACKDROP_BOTTOM, 1.5)
    garment_rgb = _jit(rng, [(28, 30, 36), (30, 42, 84), (34, 62, 46)][seed % 3], 3)
    mannequin_rgb = MANNEQUIN_WHITE if seed % 2 else MANNEQUIN_BEIGE
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(top_rgb, bottom_rgb))
    arms = _arms()
    _mannequin(studio, warp, arms, mannequin_rgb, gloss=25.0 if seed % 2 else 0.0)
    drawn = _top(arms, long_sleeves=False, neck_depth=float(rng.uniform(18, 28)))
    garment = _garment(studio, warp, drawn, garment_rgb, roundness=0.1)
    # The print's colour is the backdrop's at the chest's height (ΔE of a few units).
    t = 150 / (HEIGHT - 1)
    paper = np.asarray(top_rgb, float) * (1 - t) + np.asarray(bottom_rgb, float) * t
    print_rgb = _jit(rng, from_lab(to_lab(paper)), 1.0)
    accent = _jit(rng, (190, 40, 44), 4)
    canvas = _blank()
    word = ["STUDIO", "NORTH", "WILD", "ATHLETIC", "BASIC"][int(rng.integers(5))]
    font = cv2.FONT_HERSHEY_DUPLEX
    (tw, _), _ = cv2.getTextSize(word, font, 1.0, 3)
    scale = min(1.2, 96.0 / tw)
    (tw, _), _ = cv2.getTextSize(word, font, scale, 3)
    cv2.putText(canvas, word, (int(CX - tw / 2), 190), font, scale, 1, 3, cv2.LINE_8)
    cv2.circle(canvas, (int(CX), 226), 17, 1, 4)
    band_y = float(rng.uniform(124, 134))
    band = _poly([(0, band_y), (WIDTH, band_y), (WIDTH, band_y + 14), (0, band_y + 14)])
    stripes = _blank().astype(bool)
    accent_stripe = _blank().astype(bool)
    for i, y in enumerate((258.0, 270.0, 282.0)):
        stripe = _poly([(0, y), (WIDTH, y), (WIDTH, y + 5), (0, y + 5)])
        if i == 1:
            accent_stripe |= stripe
        else:
            stripes |= stripe
    light = warp(canvas.astype(bool) | band | stripes) & garment
    red = warp(accent_stripe) & garment
    paint = studio.cloth(light, print_rgb, roundness=0.05, folds=0.02)
    studio.add(light, _GARMENT, paint, "print")
    studio.add(red, _GARMENT, studio.cloth(red, accent, roundness=0.1), "print")
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="top",
        wearer="mannequin",
        garment_rgb=garment_rgb,
        body_rgb=mannequin_rgb,
        extras={"print_rgb": print_rgb, "backdrop_rgb": (top_rgb, bottom_rgb)},
    )


def _floor_corner(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    ys, xs = _coords()
    horizon = float(rng.uniform(0.76, 0.84) * HEIGHT)
    h0 = int(horizon)
    wall = studio.studio(_jit(rng, (236, 236, 234), 2), _jit(rng, (218, 218, 216), 2))
    floor_far, floor_near = _jit(rng, (188, 184, 178), 3), _jit(rng, (206, 202, 196), 3)
    rows = np.arange(HEIGHT, dtype=np.float32)[:, None, None]
    t = np.clip((rows - horizon) / (HEIGHT - horizon), 0, 1)
    floor = np.asarray(floor_far, np.float32) * (1 - t) + np.asarray(floor_near, np.float32) * t
    # A soft cove: the wall bends into the floor over a few pixels.
    w = np.clip((rows - horizon) / 4.0 + 0.5, 0.0, 1.0)
    low = slice(h0 - 4, HEIGHT)
    wall[low] = wall[low] * (1 - w[low]) + (floor[low] + 1.5 * studio.fine[low, :, None]) * w[low]
    studio.fill(wall)
    floor_mask = np.asarray(ys >= horizon)
    studio.tags["floor"] = floor_mask.copy()
    warp = _Warp(_affine(rng, shift=(8.0, 3.0), scale=0.025))
    arms = _arms()
    mannequin_rgb = [MANNEQUIN_BEIGE, MANNEQUIN_WHITE, MANNEQUIN_BLACK][seed % 3]
    # Shadows before the figure: a contact shadow on the floor, a soft cast shadow on the wall.
    base = warp(_stand()["base"])
    bx, by = centroid(base)
    half = max(float(np.ptp(xs[base])) / 2, 10.0)
    lx, ly = (xs[h0:] - bx) / (1.3 * half), (ys[h0:] - by - 2) / 9.0
    contact = np.zeros((HEIGHT, WIDTH), np.float32)
    contact[h0:] = 0.4 * np.exp(-(lx**2) - ly**2)
    upper = _upper_body(arms)
    drawn = _dress(arms)
    silhouette = warp(upper["torso"] | upper["head"] | upper["arms"] | drawn.mask)
    shifted = np.roll(silhouette, (8, int(rng.choice([-1, 1]) * 16)), axis=(0, 1))
    cast = 0.08 * cv2.GaussianBlur(shifted.astype(np.float32), (0, 0), 9.0)
    cast[h0:] = 0.0
    studio.img *= (1.0 - contact - cast)[..., None]
    studio.tags["shadow"] = np.asarray((contact > 0.08) | (cast > 0.02))
    _mannequin(studio, warp, arms, mannequin_rgb, gloss=25.0 if seed % 3 == 1 else 0.0)
    garment_rgb = _pick(rng, COAT_COLOURS, seed + 5)
    _garment(studio, warp, drawn, garment_rgb)
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="dress",
        wearer="mannequin",
        garment_rgb=garment_rgb,
        body_rgb=mannequin_rgb,
        extras={"horizon_y": horizon},
    )


def _frame_crossing(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    # A close crop of the nominal scene (x 78.75..281.25, y 0..270) enlarged to the frame: the
    # sleeves cross the side borders above the cuffs, the body crosses the bottom above the hem.
    s = HEIGHT / 270.0
    crop = np.array([[s, 0.0, -(CX - WIDTH / (2 * s)) * s], [0.0, s, 0.0], [0.0, 0.0, 1.0]])
    warp = _Warp(_affine(rng, shift=(4.0, 4.0), scale=0.02, angle=1.0, base=crop))
    studio.fill(studio.studio(_jit(rng, BACKDROP_TOP, 2), _jit(rng, BACKDROP_BOTTOM, 2)))
    arms = _arms()
    mannequin_rgb = [MANNEQUIN_WHITE, MANNEQUIN_BEIGE, MANNEQUIN_BLACK][seed % 3]
    _mannequin(studio, warp, arms, mannequin_rgb, gloss=20.0)
    garment_rgb = _pick(rng, COAT_COLOURS, seed + 2)
    drawn = _top(arms, long_sleeves=True, neck_depth=float(rng.uniform(12, 20)))
    garment = _garment(studio, warp, drawn, garment_rgb, depth=30.0)
    # A knit: fine vertical ribs.
    _, xs = _coords()
    rib = (1.0 + 0.04 * np.sin(xs * (2 * math.pi / 5.0)))[..., None]
    studio.img[garment] *= rib[garment]
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="top",
        wearer="mannequin",
        garment_rgb=garment_rgb,
        body_rgb=mannequin_rgb,
        extras={"crosses": ("left", "right", "bottom")},
    )


def _cream_on_cream(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    garment_rgb = _jit(rng, (238, 228, 206), 1.5)
    shift = np.array([rng.uniform(-7, -5), rng.uniform(1, 3), rng.uniform(4, 7)])
    mannequin_rgb = from_lab(to_lab(garment_rgb) + shift)  # ΔE 8-12
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(_jit(rng, BACKDROP_TOP, 1.5), _jit(rng, BACKDROP_BOTTOM, 1.5)))
    arms = _arms()
    _mannequin(studio, warp, arms, mannequin_rgb)
    neck_depth = float(rng.uniform(20, 30))
    drawn = _top(arms, long_sleeves=False, neck_depth=neck_depth)
    garment = warp(drawn.mask)
    # The garment's edges cast a soft shadow on the mannequin just outside them.
    near = cv2.GaussianBlur(garment.astype(np.float32), (0, 0), 3.0)
    studio.darken(np.asarray(0.16 * near, np.float32), where=studio.kind == _BODY)
    studio.add(garment, _GARMENT, studio.cloth(garment, garment_rgb, roundness=0.12))
    # A rib collar around the neckline, seams at the shoulders and armholes, a hem stitch.
    collar = _blank()
    seams = _blank()
    cv2.ellipse(collar, (int(CX), 100), (27, int(neck_depth) + 4), 0, 0, 180, 1, 6)
    for sgn in (-1, 1):
        cv2.line(seams, (int(CX + sgn * 26), 101), (int(CX + sgn * 74), 113), 1, 1)
        cv2.line(seams, (int(CX + sgn * 74), 113), (int(CX + sgn * 62), 165), 1, 1)
    cv2.line(seams, (int(CX - 66), 292), (int(CX + 66), 292), 1, 1)
    rib = warp(collar.astype(bool)) & garment
    _, xs = _coords()
    ribbing = np.asarray(1.0 - 0.05 * (np.sin(xs * 1.6) > 0), np.float32)
    paint = studio.cloth(rib, _jit(rng, garment_rgb, 1.0), roundness=0.0, folds=0.0)
    studio.add(rib, _GARMENT, paint.times(ribbing), "seam")
    seam = warp(seams.astype(bool)) & garment
    paint = studio.cloth(seam, garment_rgb, roundness=0.3, folds=0.0)
    studio.add(seam, _GARMENT, paint, "seam")
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="top",
        wearer="mannequin",
        garment_rgb=garment_rgb,
        body_rgb=mannequin_rgb,
        extras={},
    )


def _white_on_white(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    garment_rgb = _jit(rng, (247, 247, 244), 1.0)
    mannequin_rgb = _jit(rng, (236, 236, 234), 1.0)
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(_jit(rng, (240, 240, 238), 1.5), _jit(rng, (222, 222, 220), 1.5)))
    arms = _arms()
    _mannequin(studio, warp, arms, mannequin_rgb, gloss=16.0)
    drawn = _top(arms, long_sleeves=True, neck_depth=float(rng.uniform(26, 34)))
    garment = warp(drawn.mask)
    studio.add(garment, _GARMENT, studio.cloth(garment, garment_rgb, roundness=0.12, folds=0.04))
    # A shirt collar wrapping the neck down to two points, a button placket below it.
    nominal = _blank().astype(bool)
    for sgn in (-1, 1):
        nominal |= _poly(
            [
                (CX + sgn * 16, 86),
                (CX + sgn * 26, 94),
                (CX + sgn * 32, 108),
                (CX + sgn * 22, 136),
                (CX + sgn * 3, 126),
                (CX + sgn * 15, 104),
            ]
        )
    collar = warp(nominal)
    under = warp(np.roll(nominal, 3, axis=0)) & garment & ~collar
    studio.darken(np.asarray(0.07 * under, np.float32))
    paint = studio.cloth(collar, garment_rgb, roundness=0.25, depth=6.0, folds=0.0)
    studio.add(collar, _GARMENT, paint, "collar")
    garment = studio.kind == _GARMENT
    placket = _blank()
    cv2.line(placket, (int(CX - 6), 136), (int(CX - 6), 300), 1, 1)
    cv2.line(placket, (int(CX + 6), 136), (int(CX + 6), 300), 1, 1)
    buttons = _blank()
    for y in range(150, 300, 34):
        cv2.circle(buttons, (int(CX), y), 3, 1, -1)
    lines = warp(placket.astype(bool)) & garment
    paint = studio.cloth(lines, garment_rgb, roundness=0.3, folds=0.0)
    studio.add(lines, _GARMENT, paint, "seam")
    dots = warp(buttons.astype(bool)) & garment
    paint = studio.form(dots, _jit(rng, (226, 224, 218), 1), depth=2)
    studio.add(dots, _GARMENT, paint, "print")
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=drawn,
        garment_type="top",
        wearer="mannequin",
        garment_rgb=garment_rgb,
        body_rgb=mannequin_rgb,
        extras={},
    )


def _ghost_already(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    garment_rgb = _pick(rng, [(150, 150, 156), *COAT_COLOURS, (34, 40, 70)], seed, 3)
    warp = _Warp(_affine(rng))
    studio.fill(studio.studio(_jit(rng, (244, 244, 243), 1.5), _jit(rng, (236, 236, 235), 1.5)))
    arms = _arms()
    neck_depth = float(rng.uniform(24, 34))
    drawn = _top(arms, long_sleeves=bool(seed % 2), neck_depth=neck_depth)
    # The back of the collar rises above the shoulder line as a band of the garment's colour;
    # through the openings the garment's inside shows, in shadow: the inner back of the
    # collar (with its label), the insides of the sleeves and of the back hem.
    front = half_ellipse((CX, 100), (0.0, 1.0), 23, neck_depth)
    back_inner = half_ellipse((CX, 100), (0.0, -1.0), 19, NECK_BACK_RATIO * 23 - 3.5)
    outer = warp(drawn.mask | (drawn.neck & ~front & ~back_inner))
    studio.add(outer, _GARMENT, studio.cloth(outer, garment_rgb))
    openings = front | back_inner | np.any(drawn.sleeves, axis=0) | drawn.hems[0]
    inside = warp(openings, replicate=False) & ~outer
    inner_rgb = _scaled(garment_rgb, 0.62)
    paint = studio.cloth(inside, inner_rgb, roundness=0.3, depth=6)
    studio.add(inside, _GARMENT, paint, "interior")
    label = warp(_poly([(CX - 10, 96), (CX + 10, 96), (CX + 10, 108), (CX - 10, 108)])) & inside
    paint = studio.flat(label, _jit(rng, (238, 236, 228), 2))
    studio.add(label, _GARMENT, paint, "interior", "label", "print")
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=None,
        garment_type="top",
        wearer="none",
        garment_rgb=garment_rgb,
        body_rgb=(0, 0, 0),
        extras={},
    )


def _busy_scene(name: str, seed: int, rng: np.random.Generator) -> Scene:
    studio = _Studio(rng)
    ys, xs = _coords()
    # A shop: dim walls, shelves of boxes and folded clothes, racks, a strip light.
    canvas = studio.studio(_jit(rng, (96, 90, 84), 6), _jit(rng, (60, 52, 46), 6), vignette=30.0)
    for _ in range(70):
        x0, y0 = int(rng.integers(-40, WIDTH)), int(rng.integers(-20, HEIGHT))
        w, h = int(rng.integers(12, 110)), int(rng.integers(8, 80))
        sl = (slice(max(y0, 0), min(y0 + h, HEIGHT)), slice(max(x0, 0), min(x0 + w, WIDTH)))
        if rng.random() < 0.35:  # cardboard
            colour = np.array([176, 140, 96], np.float32) * rng.uniform(0.6, 1.1)
        else:
            colour = rng.uniform(20, 235, 3).astype(np.float32)
        patch = np.broadcast_to(colour, canvas[sl].shape).copy()
        pattern = int(rng.integers(3))
        if pattern == 0:  # stacked folded clothes: horizontal stripes
            period = int(rng.integers(4, 10))
            patch *= (0.75 + 0.25 * ((ys[sl] // period) % 2))[..., None]
        elif pattern == 1:  # hanging clothes: vertical strips of colours
            strips = rng.uniform(20, 235, (64, 3)).astype(np.float32)
            patch = strips[(xs[sl].astype(int) // int(rng.integers(5, 12))) % 64]
        canvas[sl] = patch
    for y in range(40, HEIGHT, int(rng.integers(70, 100))):  # shelf edges
        canvas[y : y + 4] = rng.uniform(150, 220)
    canvas[8:16, 40:320] = 250.0  # strip light
    canvas += (14.0 * studio.coarse + 6.0 * studio.fine + 6.0 * studio.grain)[..., None]
    studio.fill(canvas)
    warp = _Warp(_affine(rng))
    # A rail across the top; the hanger hooks on it, its bar runs along the shoulders.
    rail = _poly([(0, 28), (WIDTH, 28), (WIDTH, 33), (0, 33)])
    studio.add(rail, 0, studio.form(rail, (170, 170, 176), depth=3, gloss=40.0), "rail")
    hanger = _blank()
    cv2.ellipse(hanger, (int(CX), 40), (9, 12), 0, 180, 400, 1, 3)
    cv2.line(hanger, (int(CX), 52), (int(CX), 88), 1, 3)
    cv2.line(hanger, (int(CX - 72), 112), (int(CX), 88), 1, 5)
    cv2.line(hanger, (int(CX + 72), 112), (int(CX), 88), 1, 5)
    hung = warp(hanger.astype(bool))
    paint = studio.form(hung, _jit(rng, (150, 104, 60), 5), depth=3, gloss=30.0)
    studio.add(hung, _BODY, paint, "hanger")
    garment_rgb = _pick(rng, [(236, 234, 226), *COAT_COLOURS], seed, 3)
    drawn = _dress(_arms())
    _garment(studio, warp, drawn, garment_rgb, folds=0.1, roundness=0.2)
    return _hard_scene(
        studio,
        name=name,
        seed=seed,
        warp=warp,
        drawn=None,
        garment_type="dress",
        wearer="hanger",
        garment_rgb=garment_rgb,
        body_rgb=(150, 104, 60),
        extras={"refuse": True},
    )


_HARD_BUILDERS: dict[str, Callable[[str, int, np.random.Generator], Scene]] = {
    "model-skin-tones": lambda n, s, r: _model_top(n, s, r, white=False),
    "model-white-top": lambda n, s, r: _model_top(n, s, r, white=True),
    "model-skin-dress": _model_skin_dress,
    "printed-logo": _printed_logo,
    "floor-corner": _floor_corner,
    "frame-crossing": _frame_crossing,
    "cream-on-cream": _cream_on_cream,
    "white-on-white": _white_on_white,
    "ghost-already": _ghost_already,
    "busy-scene": _busy_scene,
}


def make_hard_scene(name: str, *, seed: int = 0) -> Scene:
    """Draw one of ``HARD_SCENES``; the seed jitters colours, pose and placement.

    ``extras`` holds ``name``, ``seed``, ``refuse`` (True only for a photo a ghost pipeline
    should refuse), masks of the visible pixels of parts where the scene has them — ``skin``,
    ``hair``, ``face`` (eyes, brows, lips), ``trousers``, ``shoes``, ``mannequin``, ``stand``,
    ``hanger`` (all inside ``body``); ``print``, ``seam``, ``collar``, ``interior``, ``label``
    (inside ``garment``); ``floor``, ``shadow``, ``rail`` (inside ``backdrop``) — and facts such
    as ``skin_rgb``, ``hair_rgb``, ``print_rgb`` or ``horizon_y``.
    """
    if name not in _HARD_BUILDERS:
        raise ValueError(f"unknown hard scene {name!r}; choose from {HARD_SCENES}")
    rng = np.random.default_rng([seed, HARD_SCENES.index(name), 7193])
    return _HARD_BUILDERS[name](name, seed, rng)


def run_ghost(
    image: Image.Image | NDArray[np.uint8], params: GhostParams
) -> tuple[GhostJob, GhostResult]:
    """``ghost_mannequin`` with the classical test inpainter, keeping the prepared job."""
    job = prepare_ghost(image, params=params)
    result = DiffusionTestInpainter().inpaint(job.request) if job.request is not None else None
    return job, finish_ghost(job, result)
