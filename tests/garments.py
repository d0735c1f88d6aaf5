"""Synthetic ghost-mannequin scenes with known geometry, and a classical test inpainter.

Every scene is drawn from polygons and ellipses, so the ground truth is exact: the backdrop,
garment and body (mannequin, stand or model) masks, and the hidden regions a ghost-mannequin
image must reconstruct — the neck opening with the back of the collar (the waistband's inner
back for trousers), one region per sleeve opening and one per hem opening. The hidden regions
follow the convention of ``workers.pipelines.ghost.igr`` (half-ellipses over each opening) but
with their own proportions, so the tests measure agreement rather than copy constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from workers.pipelines.contracts import InpaintRequest, InpaintResult, ProgressCallback

Mask = NDArray[np.bool_]
RGB = tuple[int, int, int]
Point = tuple[float, float]

WIDTH, HEIGHT = 360, 480
CX = WIDTH / 2

# Ground-truth proportions of the hidden half-ellipses (minor / major semi-axis).
NECK_BACK_RATIO = 0.4
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
Wearer = Literal["mannequin", "model"]


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
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    nx, ny = along
    ux, uy = ny, -nx
    s = dx * ux + dy * uy
    t = dx * nx + dy * ny
    return np.asarray(((s / a) ** 2 + (t / b) ** 2 <= 1.0) & (t >= 0))


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
