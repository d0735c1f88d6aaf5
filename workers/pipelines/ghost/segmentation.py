"""Backdrop / garment / body segmentation for studio photos.

The classical default assumes what a ghost-mannequin studio provides: a plain backdrop (a
sweep with a gradient and sensor noise, or a wall meeting a floor) and a mannequin or a
model. It runs in these steps:

1. **Backdrop** — a quadratic colour surface is fitted robustly to a band along the image
   borders, or two of them split at a horizon when a floor shows on both sides and stops
   there (:func:`fit_backdrop`). Lightness and chroma are thresholded apart, each from the
   border's own noise, and a graph cut seeded by that threshold settles faint objects (a pale
   garment on a white sweep). Edges are refined with a two-colour matte so that the 50% alpha
   line, not the threshold, decides the boundary. :func:`studio_refusal` says when there is
   no studio backdrop at all.
2. **Colours** — the garment's colours come from the foreground's *core* (the region deepest
   inside the silhouette); the body's from its *extremities* (head and neck or the waist
   form, legs and stand, hands). A colour seen at both is assigned to whichever it
   dominates.
3. **Skin** — a person's skin, whatever the garment's colour: this photo's skin colour is
   learnt at the extremities (:func:`detect_skin`) and every pixel joined to it that is
   closer to it than to the garment is body.
4. **Garment** — a graph cut inside the silhouette seeded by the colour labels (garment core
   fixed, body core and skin fixed as not garment), then cleaned: textured panels next to a
   textured garment kept, smooth blobs on a strongly textured edge, stray pieces and threads
   between skin and backdrop dropped, holes kept as garment unless they are a neck seen all
   round, and the garment's own inside (an existing ghost image's collar) kept.

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
# The same floor for the chroma distance alone (a backdrop's chroma varies much less).
MIN_BACKDROP_CHROMA = 3.5
# Two colour centres closer than this (ΔE) are treated as the same colour.
SAME_COLOUR_DELTA_E = 14.0
# Colours are clustered and matched with chroma weighted above lightness: shading changes
# lightness across one material, a different material (a cool fabric on a warm white
# mannequin) shows in its tint.
CLUSTER_WEIGHTS = np.array([0.7, 1.6, 1.6], np.float32)


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
    fit: BackdropFit | None = None  # the backdrop surface the masks were cut against
    foreground: Mask | None = None  # everything that is not backdrop, by the fit alone


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
    """Gaussian average of ``values`` over the pixels in ``weight`` (normalized convolution).

    A wide blur (``sigma`` above :data:`BLUR_SMALL_SIGMA`) runs on a copy shrunk so that its
    sigma is that size, then is enlarged back: the same smooth field, without kernels
    hundreds of pixels wide on a 2048-pixel photo.
    """
    wgt = np.asarray(weight, np.float32)
    vals = np.asarray(values, np.float32)
    weighted = vals * (wgt[..., None] if vals.ndim == 3 else wgt)
    h, w = wgt.shape
    factor = sigma / BLUR_SMALL_SIGMA
    if factor > 2.0:
        size = (max(2, round(w / factor)), max(2, round(h / factor)))
        num = cv2.GaussianBlur(
            cv2.resize(weighted, size, interpolation=cv2.INTER_AREA), (0, 0), BLUR_SMALL_SIGMA
        )
        den = cv2.GaussianBlur(
            cv2.resize(wgt, size, interpolation=cv2.INTER_AREA), (0, 0), BLUR_SMALL_SIGMA
        )
        num = cv2.resize(num, (w, h), interpolation=cv2.INTER_LINEAR)
        den = cv2.resize(den, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        num = cv2.GaussianBlur(weighted, (0, 0), sigma)
        den = cv2.GaussianBlur(wgt, (0, 0), sigma)
    num = np.asarray(num, np.float32).reshape(vals.shape)
    den = np.maximum(np.asarray(den, np.float32), 1e-6)
    out = num / (den[..., None] if vals.ndim == 3 else den)
    return out.astype(np.float32)


# Wide normalized blurs run at the scale where their sigma is this many pixels.
BLUR_SMALL_SIGMA = 4.0


# --- backdrop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackdropFit:
    """The fitted backdrop colour surface and the foreground threshold derived from its noise.

    ``horizon`` is the row where a floor meets the wall (a two-plane studio corner), or
    ``None`` for a single sweep. ``explained`` is the share of the border band the surface
    explains (within the threshold) and ``residual`` the median ΔE of the explained samples:
    a studio backdrop is explained almost everywhere, a room or a shop is not.
    """

    rgb: FloatImage  # (H, W, 3)
    lab: FloatImage  # (H, W, 3)
    threshold: float  # ΔE
    horizon: int | None = None
    explained: float = 1.0
    residual: float = 0.0
    lightness_threshold: float = MIN_BACKDROP_DELTA_E
    chroma_threshold: float = MIN_BACKDROP_CHROMA

    def distance(self, lab: FloatImage) -> FloatImage:
        """Distance from the backdrop in units of its noise threshold (1 = the threshold).

        Lightness and chroma are measured apart: a backdrop varies mostly in lightness
        (gradients, shading), so a faint tint (a pale blue garment on a white sweep) stands
        out in chroma long before it does in ΔE.
        """
        d = lab - self.lab
        light = np.abs(d[..., 0]) / self.lightness_threshold
        chroma = np.sqrt(d[..., 1] ** 2 + d[..., 2] ** 2) / self.chroma_threshold
        return np.asarray(np.maximum(light, chroma), np.float32)


def _design(xs: NDArray[np.float32], ys: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)


def _surface(coef: NDArray[np.float32], h: int, w: int) -> FloatImage:
    """The quadratic colour surface of ``coef`` (see :func:`_design`) over an h x w frame."""
    x = (np.arange(w, dtype=np.float32) / max(w - 1, 1) * 2 - 1)[None, :, None]
    y = (np.arange(h, dtype=np.float32) / max(h - 1, 1) * 2 - 1)[:, None, None]
    c = np.asarray(coef, np.float32)
    out = c[0] + c[2] * y + c[5] * y * y + (c[1] + c[4] * y) * x + c[3] * x * x
    return np.asarray(out, np.float32)


# A horizon (floor meeting wall) is accepted when splitting the fit there cuts the border's
# cost to this share of one surface's and the two surfaces differ by this much (RGB) there.
HORIZON_MAX_COST = 0.8
HORIZON_MIN_STEP = 20.0
# ... and the floor's surface explains at least this share of the bottom band.
HORIZON_MIN_FLOOR = 0.6
# ... and its colour covers at most this share of the rows just above the horizon.
HORIZON_MAX_ABOVE = 0.25
# Residual (RGB distance) above which a border sample is not backdrop, whatever the noise.
_OUTLIER_CAP = 24.0


def _robust_fit(
    a: NDArray[np.float32], target: NDArray[np.float32]
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float32]]:
    """Iteratively reweighted least squares: (coefficients, inliers, residuals)."""
    keep = np.ones(len(a), bool)
    coef = np.zeros((a.shape[1], 3), np.float32)
    resid = np.zeros(len(a), np.float32)
    for _ in range(4):
        if keep.sum() < a.shape[1] * 4:
            break
        coef = np.linalg.lstsq(a[keep], target[keep], rcond=None)[0].astype(np.float32)
        resid = np.linalg.norm(a @ coef - target, axis=1).astype(np.float32)
        scale = float(np.median(resid[keep])) * 1.5 + 1.0
        new_keep = resid < min(max(3.0 * scale, 6.0), _OUTLIER_CAP)
        if new_keep.sum() < 50 or np.array_equal(new_keep, keep):
            keep = new_keep if new_keep.sum() >= 50 else keep
            break
        keep = new_keep
    return coef, keep, resid


def _fit_cost(resid: NDArray[np.float32]) -> float:
    """Truncated L1 cost: outliers (an object touching the frame) count a fixed amount."""
    return float(np.minimum(resid, _OUTLIER_CAP).sum())


def fit_backdrop(rgb: RGBArray, lab: FloatImage | None = None) -> BackdropFit:
    """Fit the backdrop's colour surface to the border band, ignoring objects that touch it.

    One quadratic surface for a sweep; or, when it explains the border clearly worse, two
    surfaces split at a horizontal horizon (a studio corner: wall above, floor below), the
    floor seen on both sides of the frame. Each fit is iteratively reweighted, so samples far
    from it (a stand base, a head or a sleeve cut by the frame) are dropped before refitting.
    """
    h, w, _ = rgb.shape
    band = max(4, round(0.03 * min(h, w)))
    border = np.zeros((h, w), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    ys, xs = np.nonzero(border)
    step = max(1, len(xs) // 8000)
    ys, xs = ys[::step], xs[::step]
    nx = (xs / max(w - 1, 1) * 2 - 1).astype(np.float32)
    ny = (ys / max(h - 1, 1) * 2 - 1).astype(np.float32)
    a = _design(nx, ny)
    target = rgb[ys, xs].astype(np.float32)
    coef, keep, resid = _robust_fit(a, target)
    cost = _fit_cost(resid)

    model = _surface(coef, h, w)
    horizon: int | None = None
    best = cost
    coefs = (coef, coef)
    for row in range(round(0.45 * h), round(0.95 * h), max(2, h // 120)):
        above, below = ys < row, ys >= row
        # A floor is seen at both sides of the frame below the horizon, not only at the bottom.
        left_floor = below & (xs < band)
        right_floor = below & (xs >= w - band)
        if left_floor.sum() < 8 or right_floor.sum() < 8 or above.sum() < 60:
            continue
        c_up, k_up, r_up = _robust_fit(a[above], target[above])
        c_dn, k_dn, r_dn = _robust_fit(a[below], target[below])
        split = _fit_cost(r_up) + _fit_cost(r_dn)
        # A floor is as plain as the wall; a garment crossing the frame's lower part is not.
        plain = float(np.median(r_dn[k_dn])) <= 2.5 * float(np.median(r_up[k_up])) + 2.0
        if split < best and plain:
            best, horizon, coefs = split, row, (c_up, c_dn)
    c_up, c_dn = coefs
    if horizon is not None:
        # A floor meets the wall at a step in colour; a split that only bends a smooth
        # gradient (a vignette) is no horizon.
        row_x = np.linspace(-1, 1, 64, dtype=np.float32)
        row_y = np.full_like(row_x, horizon / max(h - 1, 1) * 2 - 1)
        line = _design(row_x, row_y)
        step_rgb = float(np.median(np.linalg.norm(line @ c_up - line @ c_dn, axis=1)))
        # And the floor is most of the bottom edge, not sleeves reaching the frame's sides.
        bottom = ys >= h - band
        floor_fit = np.linalg.norm(a[bottom] @ c_dn - target[bottom], axis=1)
        floor_share = float((floor_fit < _OUTLIER_CAP / 2).mean()) if bottom.any() else 0.0
        # A floor stops at the horizon; a garment crossing the frame's bottom goes on up.
        y0 = max(0, horizon - round(0.15 * h))
        band_rows = rgb[y0:horizon].astype(np.float32)
        at_horizon = _surface(c_dn, h, w)[horizon][None]  # no extrapolation upwards
        floor_above = np.linalg.norm(at_horizon - band_rows, axis=2) < _OUTLIER_CAP
        above_share = float(floor_above.mean()) if floor_above.size else 0.0
        if (
            best > HORIZON_MAX_COST * cost
            or step_rgb < HORIZON_MIN_STEP
            or floor_share < HORIZON_MIN_FLOOR
            or above_share > HORIZON_MAX_ABOVE
        ):
            horizon = None
    if horizon is not None:
        model = np.where(
            (np.arange(h) >= horizon)[:, None, None],
            _surface(c_dn, h, w),
            _surface(c_up, h, w),
        )
        pred = np.where((ys >= horizon)[:, None], a @ c_dn, a @ c_up)
        resid = np.linalg.norm(pred - target, axis=1).astype(np.float32)
        keep = resid < _OUTLIER_CAP
    model = np.clip(model, 0, 255).astype(np.float32)
    model_lab = rgb_to_lab(model)
    img_lab = rgb_to_lab(rgb) if lab is None else lab
    diff = img_lab[ys, xs] - model_lab[ys, xs]
    d = np.linalg.norm(diff, axis=1)
    inliers = d[keep]
    noise = float(np.quantile(inliers, 0.995)) if len(inliers) else 0.0
    threshold = max(MIN_BACKDROP_DELTA_E, 1.5 * noise)
    d_light = np.abs(diff[:, 0])[keep]
    d_chroma = np.hypot(diff[:, 1], diff[:, 2])[keep]
    t_light = max(
        MIN_BACKDROP_DELTA_E, 1.5 * float(np.quantile(d_light, 0.995)) if len(d_light) else 0.0
    )
    t_chroma = max(
        MIN_BACKDROP_CHROMA, 1.5 * float(np.quantile(d_chroma, 0.995)) if len(d_chroma) else 0.0
    )
    normalized = np.maximum(
        np.abs(diff[:, 0]) / t_light, np.hypot(diff[:, 1], diff[:, 2]) / t_chroma
    )
    explained = float((normalized <= 1.0).mean()) if len(d) else 0.0
    residual = float(np.median(inliers)) if len(inliers) else 0.0
    return BackdropFit(model, model_lab, threshold, horizon, explained, residual, t_light, t_chroma)


def _small_size(shape: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """The (w, h) the graph cuts run at, and its scale from the image."""
    h, w = shape
    scale = min(1.0, GRABCUT_SIDE / max(h, w))
    return (max(8, round(w * scale)), max(8, round(h * scale))), scale


def _run_grabcut(rgb: RGBArray, mask: NDArray[np.uint8], iterations: int) -> Mask:
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    # The colour models start from k-means on OpenCV's (per-thread) generator: seed it, so
    # the same photo always gives the same masks.
    cv2.setRNGSeed(0)
    cv2.grabCut(
        np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.uint8),
        mask,
        (0, 0, 0, 0),  # unused: initialised from the mask
        bgd,
        fgd,
        iterations,
        cv2.GC_INIT_WITH_MASK,
    )
    return np.asarray((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD))


def _upsample_mask(small: Mask, shape: tuple[int, int], scale: float) -> Mask:
    h, w = shape
    full = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.GaussianBlur(full, (0, 0), max(0.5, 0.5 / scale)) >= 0.5)


def _enclosed_by(mask: Mask) -> Mask:
    """Pixels outside ``mask`` that it encloses (not connected to the frame's border)."""
    outside = (~mask).astype(np.uint8)
    _, labels = cv2.connectedComponents(outside, connectivity=4)
    lab = np.asarray(labels)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return np.asarray((~mask) & ~np.isin(lab, border))


def _refine_foreground(rgb: RGBArray, dist: FloatImage, cand: Mask) -> Mask:
    """Graph-cut object/backdrop seeded by the colour distance: a light garment on a light
    backdrop, or a white mannequin on a white sweep, is separated by the colours of each
    side and the edges between them, not by one ΔE threshold.
    """
    size, scale = _small_size(cand.shape)

    def small(m: Mask) -> Mask:
        return np.asarray(cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)) > 0

    img = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.uint8)
    c = small(cand)
    strong = small(dist > 2.0) & c
    r = max(3, round(0.04 * max(size)))
    mask = np.full(c.shape, cv2.GC_BGD, np.uint8)
    mask[dilate(c, r)] = cv2.GC_PR_BGD
    # Backdrop-coloured regions the object encloses are as likely object (a white top
    # between a model's arms, head and trousers) as backdrop seen through a gap: the
    # colours of the open backdrop decide.
    mask[_enclosed_by(c)] = cv2.GC_PR_FGD
    mask[c] = cv2.GC_PR_FGD
    mask[erode(strong, 2)] = cv2.GC_FGD
    if not (mask == cv2.GC_FGD).any() or not (mask == cv2.GC_BGD).any():
        return cand
    refined = _upsample_mask(_run_grabcut(img, mask, 3), cand.shape, scale)
    # Keep the threshold's answer where the two agree and the cut's on the boundary band.
    return refined | (cand & erode(cand, 2))


def _foreground(rgb: RGBArray, lab: FloatImage, fit: BackdropFit) -> tuple[Mask, FloatImage]:
    """Binary foreground and a soft matte, refined on a thin band around the silhouette."""
    h, w = rgb.shape[:2]
    dist = fit.distance(lab)
    cand = dist > 1.0
    cand = np.asarray(cv2.medianBlur(cand.astype(np.uint8), 3)) > 0
    area = h * w
    # Backdrop-coloured patches inside the silhouette (a light print) are not backdrop unless
    # they are big or reach the frame.
    cand = fill_small_holes(cand, max(16, area // 400))
    cand = remove_small(cand, max(16, area // 2000))
    if cand.any() and not cand.all():
        cand = _refine_foreground(rgb, dist, cand)
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
    weighted, _, labels = kmeans(np.concatenate([core_samples, ext_samples]) * CLUSTER_WEIGHTS, 6)
    centres = (weighted / CLUSTER_WEIGHTS).astype(np.float32)
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
        d = (((px - c) * CLUSTER_WEIGHTS) ** 2).sum(1)
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


# --- people, and the graph-cut refinement ------------------------------------------------

# Zones of the silhouette where a person's skin shows (face and neck, hands, legs), as
# fractions of the silhouette's height (top, bottom) and width (each side).
_EXTREME_TOP, _EXTREME_BOTTOM, _EXTREME_SIDE = 0.16, 0.22, 0.12
# A skin-coloured region of the extremities is skin when it differs at least this much (ΔE)
# from every garment colour of the core, or is smooth where the garment is textured.
SKIN_GARMENT_DELTA_E = 9.0
# A hole in the garment's top NECK_ZONE (share of its height), at least NECK_HOLE_WIDTH of
# its width across, is its neck opening seen all round, not a print.
NECK_ZONE, NECK_HOLE_WIDTH = 0.3, 0.12
# Where the silhouette ends differing from the garment's main colour by this much (weighted
# ΔE) the form shows; garment pixels within FORM_MATCH of it that reach there are the form.
FORM_DELTA_E = 10.0
FORM_MATCH = 6.0
# A garment this textured (median fine-texture deviation, L units) loses smooth pieces on its
# edge thicker than BLOB_RADIUS of the diagonal.
STRONG_TEXTURE = 4.0
BLOB_RADIUS = 0.012
# Textured silhouette next to a textured garment within this ΔE of its colours is garment.
RESCUE_DELTA_E = 20.0
# A region inside the garment of a garment colour's hue (within this many degrees) but darker
# is the garment's own inside in shadow; below NEUTRAL_CHROMA colours have no hue to compare.
INSIDE_HUE_DEGREES = 15.0
NEUTRAL_CHROMA = 8.0
# Garment strips narrower than about twice this (share of the diagonal) are checked for
# lying between skin and backdrop.
STRIP_WIDTH = 0.006
# Body thinner than this (half-width, share of the diagonal) along the garment is its edge.
HALO_WIDTH = 0.006
# Body this far (ΔE) from every garment colour is body, whatever the graph cut prefers.
CERTAIN_BODY_DELTA_E = 30.0
# Long side of the image the graph cut runs on.
GRABCUT_SIDE = 448


def _colour_distance(lab: FloatImage, centres: NDArray[np.float32]) -> FloatImage:
    """ΔE from each pixel to the nearest of ``centres`` (infinite when there are none)."""
    best = np.full(lab.shape[:2], np.inf, np.float32)
    for c in np.asarray(centres, np.float32).reshape(-1, 3):
        d = lab - c
        np.minimum(best, np.einsum("...i,...i->...", d, d), out=best)
    return np.asarray(np.sqrt(best), np.float32)


def _extreme_zones(fg: Mask) -> Mask:
    ys, xs = np.nonzero(fg)
    zones = np.zeros_like(fg)
    if len(ys) == 0:
        return zones
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    height, width = bottom - top + 1, right - left + 1
    zones[top : top + max(2, round(_EXTREME_TOP * height))] = True
    zones[bottom - max(2, round(_EXTREME_BOTTOM * height)) + 1 : bottom + 1] = True
    zones[:, left : left + max(2, round(_EXTREME_SIDE * width))] = True
    zones[:, right - max(2, round(_EXTREME_SIDE * width)) + 1 : right + 1] = True
    return zones & fg


def _local_texture(lab: FloatImage, radius: float) -> FloatImage:
    """Local standard deviation of lightness: fabric weave and prints are rough, skin is not."""
    lum = lab[..., 0]
    mean = np.asarray(cv2.GaussianBlur(lum, (0, 0), radius), np.float32)
    sq = np.asarray(cv2.GaussianBlur(lum * lum, (0, 0), radius), np.float32)
    return np.sqrt(np.maximum(sq - mean * mean, 0.0)).astype(np.float32)


def detect_skin(rgb: RGBArray, lab: FloatImage, fg: Mask, garment_colours: FloatImage) -> Mask:
    """Skin of a person wearing the garment, found from the photo's own skin colour.

    A colour rule (YCrCb) admits every complexion but also beige and pink fabric, so it only
    proposes. Seeds are skin-coloured pixels in the silhouette's extremities (face and neck,
    hands, legs) that differ from the garment's core colours, or, on a textured garment, are
    smooth where it is not. They give this photo's skin colour; a pixel of the silhouette is
    skin when it is close to that colour, closer to it than to any garment colour, smooth if
    the garment is not, and joined to the seeds.
    """
    h, w = fg.shape
    diag = float(np.hypot(h, w))
    rule = skin_mask(rgb) & erode(fg, 1)
    zones = _extreme_zones(fg)
    min_area = max(20, round(2e-4 * h * w))
    texture = _local_texture(lab, max(1.5, 0.004 * diag))
    interior = erode(fg, 3) & ~zones
    garment_texture = float(np.median(texture[interior])) if interior.any() else 0.0
    # Skin is smooth; only a clearly textured garment (a weave, a print) can be told by it.
    textured = garment_texture >= 2.5
    smooth = texture < 0.6 * garment_texture if textured else np.ones_like(fg)
    d_garment = _colour_distance(lab, garment_colours)
    # Unlike the garment's own colours, and not one of them in shadow (a sleeve's end).
    distinct = (d_garment >= SKIN_GARMENT_DELTA_E) & ~shaded_like(lab, garment_colours)
    seeds = rule & zones & (distinct | (smooth if textured else np.zeros_like(fg)))
    seeds = np.asarray(cv2.morphologyEx(seeds.astype(np.uint8), cv2.MORPH_OPEN, disk(1)) > 0)
    seeds = remove_small(seeds, min_area)
    if seeds.sum() < min_area:
        return np.zeros_like(fg)
    samples = _subsample(lab[seeds], 4000, seed=2)
    mean = samples.mean(0)
    cov = np.cov(samples.T) + np.eye(3) * 4.0
    inv = np.linalg.inv(cov)
    diff = lab - mean
    maha = np.einsum("...i,ij,...j->...", diff, inv, diff)
    d_skin = np.linalg.norm(diff, axis=-1)
    close = rule & (maha <= 9.0) & (d_skin < d_garment) & smooth
    # Only what is joined to the skin seen at the extremities: not a patch of pink fabric.
    _, labels, _, _ = cv2.connectedComponentsWithStats(close.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels)
    hit = np.unique(lab_img[seeds & close])
    hit = hit[hit > 0]
    skin = np.isin(lab_img, hit) | seeds
    skin = np.asarray(cv2.morphologyEx(skin.astype(np.uint8), cv2.MORPH_CLOSE, disk(2)) > 0)
    return remove_small(skin & fg, min_area)


def _grabcut(
    rgb: RGBArray, fg: Mask, garment: Mask, body: Mask, sure_body: Mask, iterations: int = 4
) -> Mask:
    """Graph-cut garment/not-garment inside the silhouette, seeded by the colour labelling.

    The garment's core and the backdrop away from the silhouette are fixed; the body's core
    and every skin pixel are fixed as not garment; the rest is decided by colour models of the
    two sides and the edges between them.
    """
    size, scale = _small_size(fg.shape)

    def small(m: Mask) -> Mask:
        return np.asarray(cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)) > 0

    img = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.uint8)
    f, g, b, sb = small(fg), small(garment), small(body), small(sure_body)
    r = max(2, round(0.02 * max(size)))
    mask = np.full(f.shape, cv2.GC_PR_BGD, np.uint8)
    mask[g] = cv2.GC_PR_FGD
    mask[~dilate(f, 2)] = cv2.GC_BGD
    mask[erode(g, r) & ~sb] = cv2.GC_FGD
    core_body = (erode(b, r) | sb) & ~erode(g, r)
    mask[core_body] = cv2.GC_BGD
    if not (mask == cv2.GC_FGD).any() or not ((mask == cv2.GC_PR_BGD) | (mask == cv2.GC_BGD)).any():
        return garment
    return _upsample_mask(_run_grabcut(img, mask, iterations), fg.shape, scale) & fg


def _textured_rescue(
    lab: FloatImage, fg: Mask, garment: Mask, skin: Mask, garment_colours: NDArray[np.float32]
) -> Mask:
    """Silhouette next to a textured garment, as textured and of its colours, is garment.

    The graph cut sees colour only: a lighter panel of a houndstooth dress between the dress
    and an arm looks like a blend of skin and backdrop to it. Skin and mannequins are smooth.
    """
    # Fine texture only (the weave), so the step across an outline does not count.
    texture = _local_texture(lab - cv2.GaussianBlur(lab, (0, 0), 2.0), 1.0)
    inner = erode(garment, 3)
    if not inner.any():
        return np.zeros_like(fg)
    garment_texture = float(np.median(texture[inner]))
    if garment_texture < 2.0:
        return np.zeros_like(fg)
    candidate = fg & ~garment & ~skin & (texture >= 0.8 * garment_texture)
    candidate &= _colour_distance(lab, garment_colours) <= RESCUE_DELTA_E
    candidate = np.asarray(
        cv2.morphologyEx(candidate.astype(np.uint8), cv2.MORPH_OPEN, disk(1)) > 0
    )
    _, labels, _, _ = cv2.connectedComponentsWithStats(candidate.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels)
    joined = np.unique(lab_img[dilate(garment, 1) & candidate])
    joined = joined[joined > 0]
    return np.asarray(np.isin(lab_img, joined))


def hanging_pieces(mask: Mask) -> Mask:
    """Thin pieces hanging below a garment's body: what an opening of 1% of the diagonal
    removes, at least 3% of the diagonal long and reaching below the opened shape's bottom
    (seams of a cut along legs or a stand). Straps and drawstrings lie above or on it."""
    h, w = mask.shape
    diag = float(np.hypot(h, w))
    r = max(2, round(0.01 * diag))
    main = np.asarray(cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk(r)) > 0)
    rows = np.flatnonzero(main.any(axis=1))
    out = np.zeros_like(mask)
    if len(rows) == 0:
        return out
    bottom = int(rows[-1])
    thin = mask & ~dilate(main, 1)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(thin.astype(np.uint8), connectivity=8)
    st = np.asarray(stats)
    keep = np.zeros(n, bool)
    for i in range(1, n):
        y, bh = int(st[i, cv2.CC_STAT_TOP]), int(st[i, cv2.CC_STAT_HEIGHT])
        keep[i] = bh >= 0.03 * diag and y + bh - 1 > bottom + 0.01 * diag
    return np.asarray(keep[np.asarray(labels)])


def _form_at_the_ends(lab: FloatImage, fg: Mask, garment: Mask, colours: ColourModel) -> Mask:
    """Garment pixels that are the mannequin where the silhouette leaves the frame or ends.

    The rows where the silhouette ends (legs or a stand cut by the frame, a neck stub) show
    the form's colour. When that colour differs from the garment's main colour, garment
    pixels of the form's colour that reach those rows are the form (a white mannequin under a
    pale mesh), while the same colour enclosed in the garment (white embroidery) stays.
    """
    out = np.zeros_like(garment)
    rows = np.flatnonzero(fg.any(axis=1))
    if len(rows) == 0 or len(colours.garment) == 0:
        return out
    depth = max(2, round(0.03 * (rows[-1] - rows[0] + 1)))
    main = colours.garment[int(np.argmax(colours.garment_weights))]
    for band in (slice(rows[0], rows[0] + depth), slice(rows[-1] - depth + 1, rows[-1] + 1)):
        ends = np.zeros_like(fg)
        ends[band] = fg[band]
        if ends.sum() < 20:
            continue
        colour = np.median(lab[ends], axis=0)
        if float(np.linalg.norm((colour - main) * CLUSTER_WEIGHTS)) < FORM_DELTA_E:
            continue  # the garment itself reaches the frame there
        like = garment & (np.linalg.norm((lab - colour) * CLUSTER_WEIGHTS, axis=-1) < FORM_MATCH)
        like = np.asarray(cv2.morphologyEx(like.astype(np.uint8), cv2.MORPH_OPEN, disk(2)) > 0)
        _, labels = cv2.connectedComponents(like.astype(np.uint8), connectivity=8)
        lab_img = np.asarray(labels)
        hit = np.unique(lab_img[ends & like])
        out |= np.isin(lab_img, hit[hit > 0])
    return out


def _smooth_blobs(lab: FloatImage, garment: Mask) -> Mask:
    """Smooth, thick pieces on the edge of a strongly textured garment: a floor's cove or a
    patch of wall that the colour-only cut took with a sequinned or woven garment."""
    texture = _local_texture(lab - cv2.GaussianBlur(lab, (0, 0), 2.0), 1.0)
    inner = erode(garment, 3)
    if not inner.any():
        return np.zeros_like(garment)
    garment_texture = float(np.median(texture[inner]))
    if garment_texture < STRONG_TEXTURE:
        return np.zeros_like(garment)
    smooth = garment & (cv2.GaussianBlur(texture, (0, 0), 2.0) < 0.3 * garment_texture)
    smooth = np.asarray(cv2.morphologyEx(smooth.astype(np.uint8), cv2.MORPH_OPEN, disk(2)) > 0)
    h, w = garment.shape
    thick = max(2.0, BLOB_RADIUS * float(np.hypot(h, w)))
    n, labels, _, _ = cv2.connectedComponentsWithStats(smooth.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels, np.intp)
    depth = np.asarray(cv2.distanceTransform(smooth.astype(np.uint8), cv2.DIST_L2, 3), np.float32)
    peak = np.zeros(n, np.float32)
    np.maximum.at(peak, lab_img.ravel(), depth.ravel())
    edge = np.zeros(n, bool)
    edge[np.unique(lab_img[dilate(~garment, 1) & smooth])] = True
    drop = (peak >= thick) & edge
    drop[0] = False
    return np.asarray(drop[lab_img])


def _skin_edge_strips(garment: Mask, skin: Mask, fg: Mask) -> Mask:
    """Thin garment strips running between skin and backdrop: the shaded edge of an arm or
    a leg that the colour cut gave to a dark garment. A strap lies on skin on both sides."""
    h, w = garment.shape
    r = max(2, round(STRIP_WIDTH * float(np.hypot(h, w))))
    core = np.asarray(cv2.morphologyEx(garment.astype(np.uint8), cv2.MORPH_OPEN, disk(r)) > 0)
    strips = garment & ~dilate(core, 1)
    n, labels, _, _ = cv2.connectedComponentsWithStats(strips.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels)
    out = np.zeros_like(garment)
    backdrop = ~fg
    for i in range(1, n):
        strip = lab_img == i
        ring = dilate(strip, 2) & ~garment
        if not ring.any():
            continue
        if float(skin[ring].mean()) >= 0.25 and float(backdrop[ring].mean()) >= 0.25:
            out |= strip
    return out


def _drop_halos(body: Mask, garment: Mask) -> Mask:
    """Body components thinner than :data:`HALO_WIDTH` of the diagonal that lie along the
    garment are its edge (backdrop mixed into its outline, a shadow line), not a body part.
    """
    h, w = body.shape
    limit = HALO_WIDTH * float(np.hypot(h, w))
    n, labels, _, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), connectivity=8)
    if n <= 1:
        return body
    lab = np.asarray(labels, np.intp)
    depth = np.asarray(cv2.distanceTransform(body.astype(np.uint8), cv2.DIST_L2, 3), np.float32)
    peak = np.zeros(n, np.float32)
    np.maximum.at(peak, lab.ravel(), depth.ravel())
    near = np.zeros(n, bool)
    near[np.unique(lab[dilate(garment, 2) & body])] = True
    drop = (peak < limit) & near
    drop[0] = False
    return np.asarray(body & ~drop[lab])


def shaded_like(lab: FloatImage, garment_colours: FloatImage) -> Mask:
    """Pixels (any leading shape, Lab last) that are one of the garment's colours with less
    light: shade lowers lightness and chroma together and keeps the hue."""
    out = np.zeros(lab.shape[:-1], bool)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    hue = np.arctan2(lab[..., 2], lab[..., 1])
    for g in garment_colours:
        g_chroma = float(np.hypot(g[1], g[2]))
        darker = (g[0] - lab[..., 0]) >= 3.0
        if g_chroma < NEUTRAL_CHROMA:
            out |= darker & (chroma < NEUTRAL_CHROMA)
            continue
        turn = np.abs(hue - float(np.arctan2(g[2], g[1])))
        turn = np.minimum(turn, 2 * np.pi - turn)
        out |= (
            darker
            & (chroma >= 0.3 * g_chroma)
            & (chroma <= 1.1 * g_chroma)
            & (turn <= np.radians(INSIDE_HUE_DEGREES))
        )
    return out


def _garment_inside(
    lab: FloatImage, garment: Mask, body: Mask, garment_colours: NDArray[np.float32]
) -> Mask:
    """Body components that are the garment's own inside (a ghost photo's inner collar).

    Such a region is mostly bordered by the garment and has a garment colour's hue, only
    darker: it is the same fabric in shadow. A mannequin or skin differs in hue (or is
    lighter), a head or hair sticks out to the backdrop, and legs or a stand run out of the
    frame.
    """
    out = np.zeros_like(body)
    if len(garment_colours) == 0 or not body.any():
        return out
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels)
    ring_garment = dilate(garment, 1)
    h, w = body.shape
    for i in range(1, n):
        x, y, bw, bh, _ = np.asarray(stats)[i]
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue  # a body part cut by the frame (legs, a stand) is no inside
        region = lab_img == i
        ring = dilate(region, 1) & ~region
        if not ring.any() or float(ring_garment[ring].mean()) < 0.45:
            continue
        if bool(shaded_like(np.median(lab[region], axis=0), garment_colours)):
            out |= region
    return out


def _main_garment(garment: Mask, lab: FloatImage, min_share: float = 0.03) -> Mask:
    """The garment's main piece, and other pieces of at least ``min_share`` of it, close to
    it and of its colours (a sleeve cut off by an arm), not a stray part of the mannequin."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(garment.astype(np.uint8), connectivity=8)
    if n <= 2:
        return garment
    lab_img = np.asarray(labels)
    areas = np.asarray(stats)[1:, cv2.CC_STAT_AREA]
    main = int(np.argmax(areas)) + 1
    centres, weights, _ = kmeans(_subsample(lab[lab_img == main], 3000), 5)
    centres = centres[weights >= 0.05]
    keep = np.zeros(n, bool)
    keep[main] = True
    near_main = dilate(lab_img == main, max(2, round(0.02 * float(np.hypot(*garment.shape)))))
    for i in range(1, n):
        if i == main or areas[i - 1] < min_share * areas.max():
            continue
        if not (near_main & (lab_img == i)).any():
            continue
        colour = np.median(lab[lab_img == i], axis=0)
        keep[i] = float(np.min(np.linalg.norm(centres - colour, axis=1))) <= SAME_COLOUR_DELTA_E
    return np.asarray(keep[lab_img])


def _fill_enclosed(garment: Mask, body_colour: Mask, max_share: float) -> Mask:
    """Holes enclosed by the garment are garment (a print, a logo), unless they are open to
    the frame, big and coloured like the body, or a wide hole in the garment's top: the neck
    opening seen all round (the inside of a hood, stuffing in a collar).
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        (~garment).astype(np.uint8), connectivity=4
    )
    h, w = garment.shape
    ys, xs = np.nonzero(garment)
    if len(ys) == 0:
        return garment
    top, height = int(ys.min()), int(np.ptp(ys)) + 1
    width = int(np.ptp(xs)) + 1
    lab_img = np.asarray(labels)
    area_garment = max(int(garment.sum()), 1)
    fill = np.zeros(n, bool)
    for i in range(1, n):
        x, y, bw, bh, area = np.asarray(stats)[i]
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue
        centre_y = y + bh / 2
        if centre_y < top + NECK_ZONE * height and bw >= NECK_HOLE_WIDTH * width:
            continue
        region = lab_img == i
        if area <= 0.004 * area_garment:
            fill[i] = True
        elif area <= max_share * area_garment:
            fill[i] = float(body_colour[region].mean()) < 0.5
    return np.asarray(garment | fill[lab_img])


# --- is this a studio photo at all? ---------------------------------------------------------

# Below this share of the border band explained by the backdrop fit there is no backdrop.
MIN_STUDIO_BORDER = 0.5
# ... unless what hides the backdrop there is of few colours (entropy in bits, see
# _colour_entropy): a garment filling the frame, not a scene.
BUSY_BORDER_ENTROPY = 4.7
# A "subject" with this share of its outline on its bounding box and a colour entropy of at
# least SCENE_ENTROPY bits is a framed picture of a scene.
SCENE_BOX_SHARE = 0.5
SCENE_ENTROPY = 3.8


def _colour_entropy(lab: FloatImage) -> float:
    """Entropy (bits) of a coarse Lab histogram (8 bins a channel) of the given pixels."""
    if len(lab) == 0:
        return 0.0
    q = np.stack(
        [
            np.clip(lab[:, 0] // 12.5, 0, 7),
            np.clip((lab[:, 1] + 64) // 16, 0, 7),
            np.clip((lab[:, 2] + 64) // 16, 0, 7),
        ],
        axis=1,
    ).astype(np.int64)
    p = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512) / len(q)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _box_outline_share(mask: Mask) -> float:
    """Share of the main outline lying on its own bounding box: 1 for a rectangle."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    main = max(contours, key=cv2.contourArea).reshape(-1, 2)
    x, y, bw, bh = cv2.boundingRect(main)
    on = (
        (np.abs(main[:, 0] - x) <= 2)
        | (np.abs(main[:, 0] - (x + bw - 1)) <= 2)
        | (np.abs(main[:, 1] - y) <= 2)
        | (np.abs(main[:, 1] - (y + bh - 1)) <= 2)
    )
    return float(on.mean())


def studio_refusal(fit: BackdropFit, foreground: Mask | None, lab: FloatImage) -> str | None:
    """Why a photo is not a studio shot (``None`` when it is).

    A studio shot has a plain backdrop around the subject: the border band fits a smooth
    surface (a sweep, or a wall and a floor); a room, a shop or a street does not, and shows
    many colours where the sweep is missing (a garment filling the frame shows its own few,
    and is processed, flagged as touching the frame). Nor is a
    plain frame around a picture of a whole scene a backdrop: the "subject" is then a
    rectangle (most of its outline on its bounding box) of many colours, where a garment on
    a mannequin or model has a shaped outline and a few colours.
    """
    if fit.explained < MIN_STUDIO_BORDER:
        # A garment filling the frame also hides the backdrop at the border, but with its own
        # few colours; a room or a shop shows many.
        h, w = fit.lab.shape[:2]
        band = max(4, round(0.03 * min(h, w)))
        border = np.zeros((h, w), bool)
        border[:band], border[-band:], border[:, :band], border[:, -band:] = (True,) * 4
        outliers = lab[border & (fit.distance(lab) > 1.0)]
        if _colour_entropy(outliers) >= BUSY_BORDER_ENTROPY:
            return (
                f"no plain backdrop: only {fit.explained:.0%} of the photo's border fits a "
                "studio sweep, and the rest is of many colours"
            )
    if foreground is None or not foreground.any():
        return None
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    h, w = foreground.shape
    framed = rows[0] > 0 and cols[0] > 0 and rows[-1] < h - 1 and cols[-1] < w - 1
    if not framed:
        return None  # a garment filling the frame is not a picture inside a frame
    boxy = _box_outline_share(foreground)
    entropy = _colour_entropy(lab[foreground])
    if boxy >= SCENE_BOX_SHARE and entropy >= SCENE_ENTROPY:
        return "the subject is a rectangular scene of many colours inside a plain frame"
    return None


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
        body0 = _label_body(lab, fg, colours)
        body0 = remove_small(body0, max(12, area // 4000))
        garment0 = remove_small(fg & ~body0, max(16, area // 1000))
        skin = detect_skin(rgb, lab, fg, colours.garment)
        if skin.any():
            # A person: skin is body whatever the garment's colour.
            body0 = (body0 | skin) & fg
            garment0 = garment0 & ~skin
        # Body whose colour no garment colour comes near is fixed as body however thin
        # (stuffing seen inside a hood); the rest of the body only at its core.
        certain = (
            body0 & ~garment0 & (_colour_distance(lab, colours.garment) >= CERTAIN_BODY_DELTA_E)
        )
        garment = _grabcut(rgb, fg, garment0, body0 & ~garment0, skin | erode(certain, 1))
        garment |= _textured_rescue(lab, fg, garment, skin, colours.garment)
        garment &= ~_smooth_blobs(lab, garment)
        garment &= ~_form_at_the_ends(lab, fg, garment, colours)
        garment &= ~hanging_pieces(garment)
        # Threads a few pixels wide running off along an arm or a leg are the cut's seams,
        # not fabric: open them away, then give the kept shape its own edge back.
        thread = max(1, round(0.0025 * float(np.hypot(h, w))))
        opened = np.asarray(
            cv2.morphologyEx(garment.astype(np.uint8), cv2.MORPH_OPEN, disk(thread)) > 0
        )
        garment = opened | (garment & dilate(opened, 1))
        if skin.any():
            garment &= ~_skin_edge_strips(garment, skin, fg)
        garment = _main_garment(remove_small(garment, max(16, area // 1000)), lab)
        garment = _fill_enclosed(garment, (body0 & ~garment0) | skin, 0.02) & ~skin
        body = _drop_halos(fg & ~garment, garment)
        inside = _garment_inside(lab, garment, body, colours.garment)
        garment, body = garment | inside, body & ~inside
        if skin.any():
            colours = colours_from_masks(lab, garment, body)
            colours = ColourModel(colours.garment, colours.garment_weights, colours.body, "skin")
        elif not body.any():
            # Nothing to remove (an existing ghost image): no body colours to look for.
            none = np.zeros((0, 3), np.float32)
            colours = ColourModel(colours.garment, colours.garment_weights, none, "none")
        return Segmentation(
            ~(garment | body),
            garment,
            body,
            _garment_alpha(matte, garment, body),
            fit.rgb,
            colours,
            source,
            fit,
            fg,
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
        fit,
        fg,
    )


def _garment_alpha(matte: FloatImage, garment: Mask, body: Mask) -> FloatImage:
    """The matte around the garment: 1 inside, fractional on its backdrop edge, 0 elsewhere."""
    alpha = np.where(dilate(garment, 1) & ~body, matte, 0.0).astype(np.float32)
    alpha[garment] = np.maximum(alpha[garment], 0.5)
    alpha[erode(garment, 1)] = 1.0
    return alpha
