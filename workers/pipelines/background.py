"""Background removal for studio shots: a classical matte that needs no model weights.

Studio backdrops are plain but not flat: the light falls off towards the floor and into the
corners, and the sensor adds noise. The backdrop is therefore modelled as a smooth surface
per colour channel, a quadratic in x and y fitted robustly to the image border where the
backdrop shows, then refined to a quartic on every pixel that matches it. Each pixel's colour
distance to that surface, measured against the noise seen on the backdrop itself, decides
what is garment; connected-component cleanup removes dust and fills small gaps; along the
edges the matte is solved per pixel from a two-colour model (garment colour nearby,
backdrop colour from the surface), which gives real partial coverage instead of a stair
step. numpy and Pillow only, so CPU-only installs can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]

# The backdrop surface is fitted on an image at most this large: the illumination is smooth,
# and a small image keeps the robust fit cheap.
_FIT_SIDE = 256
# Border band used for the first fit, as a fraction of the shorter side.
_BORDER_FRACTION = 0.04
# A pixel is garment when its (3x3-smoothed) distance to the backdrop exceeds this many
# standard deviations of the smoothed backdrop noise. The false-positive rate per pixel is
# then about 1e-5, and those few pixels form specks that the cleanup removes.
_NOISE_MULTIPLE = 3.0
# Whatever the measured noise, 8-bit quantisation and compression leave a few units.
_MIN_THRESHOLD = 3.0
_MIN_SIGMA = 0.5
# Degree of the backdrop surface once the whole frame supports it: light falloff (cos^4)
# and a sweep's curvature are smooth but not quadratic. The first fit, on the border
# alone, stays quadratic because a higher degree would extrapolate wildly into the middle.
_MAX_DEGREE = 4


@dataclass(frozen=True)
class BackgroundResult:
    """The cut-out: ``image`` is RGB on white or RGBA, ``alpha`` the matte (L)."""

    image: Image.Image
    alpha: Image.Image
    report: dict[str, Any]


# --- small array helpers -----------------------------------------------------------------


def _shifted(a: FloatArray, axis: int, start: int, length: int) -> FloatArray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, start + length)
    return a[tuple(index)]


def _box_sum(a: FloatArray, radius: int) -> FloatArray:
    """Sum over a (2r+1) square window, edges clamped.

    Each axis adds shifted copies, building windows of 1, 2, 4, ... samples and combining
    those the window's length needs in binary: about 2*log2(2r+1) additions per axis,
    all on contiguous blocks, which beats a strided cumulative sum.
    """
    out = a
    size = 2 * radius + 1
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        block = np.pad(out, pad, mode="edge")
        acc: FloatArray | None = None
        offset, width = 0, 1
        while True:
            if size & width:
                part = _shifted(block, axis, offset, n)
                acc = part.copy() if acc is None else acc + part
                offset += width
            if width * 2 > size:
                break
            length = block.shape[axis] - width
            block = _shifted(block, axis, 0, length) + _shifted(block, axis, width, length)
            width *= 2
        assert acc is not None
        out = acc
    return out


def _dilate(mask: BoolArray, radius: int) -> BoolArray:
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for d in range(1, radius + 1):
            lead = [slice(None)] * 2
            trail = [slice(None)] * 2
            lead[axis], trail[axis] = slice(d, n), slice(0, n - d)
            out[tuple(lead)] |= src[tuple(trail)]
            out[tuple(trail)] |= src[tuple(lead)]
    return out


def _erode(mask: BoolArray, radius: int) -> BoolArray:
    # Outside the frame counts as mask: a garment cut off by the frame keeps its edge there.
    return ~_dilate(~mask, radius)


def _gaussian_radius(sigma: float) -> int:
    return max(1, int(np.ceil(3.0 * sigma)))


def _gaussian(a: FloatArray, sigma: float) -> FloatArray:
    radius = _gaussian_radius(sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = a
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(taps):
            acc += weight * _shifted(padded, axis, k, n)
        out = acc
    return out


# --- connected components ----------------------------------------------------------------


@dataclass(frozen=True)
class _Runs:
    """A binary mask as horizontal runs, each run tagged with its component label."""

    row: IntArray
    start: IntArray
    end: IntArray  # exclusive
    label: IntArray
    count: int
    area: IntArray  # per label
    touches_border: BoolArray  # per label


def _components(mask: BoolArray, *, eight: bool) -> _Runs:
    """Label connected components by run-length union-find, all in numpy.

    A pixel-by-pixel flood fill in Python would take seconds on a large image; runs turn
    the problem into a few tens of thousands of overlap tests that vectorise.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    row, start = np.nonzero(step == 1)
    _, end = np.nonzero(step == -1)
    n = row.size
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return _Runs(empty, empty, empty, empty, 0, empty, np.zeros(0, dtype=np.bool_))

    # Runs in adjacent rows touch when their column ranges overlap (or meet diagonally,
    # for 8-connectivity). Keys laid out row by row make every row's runs searchable at once.
    stride = w + 2
    key_start = row * stride + start
    key_end = row * stride + end
    has_above = row > 0
    b_runs = np.nonzero(has_above)[0]
    base = (row[b_runs] - 1) * stride
    if eight:
        lo = np.searchsorted(key_end, base + start[b_runs], side="left")
        hi = np.searchsorted(key_start, base + end[b_runs], side="right")
    else:
        lo = np.searchsorted(key_end, base + start[b_runs], side="right")
        hi = np.searchsorted(key_start, base + end[b_runs], side="left")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    first = np.repeat(lo, counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    edge_a = first + offsets
    edge_b = np.repeat(b_runs, counts)

    parent = np.arange(n)
    while edge_a.size:
        pa, pb = parent[edge_a], parent[edge_b]
        differ = pa != pb
        if not differ.any():
            break
        pa, pb = pa[differ], pb[differ]
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        edge_a, edge_b = edge_a[differ], edge_b[differ]

    roots, label = np.unique(parent, return_inverse=True)
    count = roots.size
    area = np.bincount(label, weights=end - start, minlength=count).astype(np.int64)
    on_border = (row == 0) | (row == h - 1) | (start == 0) | (end == w)
    touches = np.zeros(count, dtype=np.bool_)
    touches[label[on_border]] = True
    return _Runs(row, start, end, label, count, area, touches)


def _run_pixels(runs: _Runs, selected: BoolArray, width: int) -> tuple[IntArray, IntArray]:
    """Flat pixel indices of the runs whose label is selected, and each pixel's label."""
    keep = selected[runs.label]
    lengths = (runs.end - runs.start)[keep]
    firsts = (runs.row * width + runs.start)[keep]
    total = int(lengths.sum())
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(firsts, lengths) + offsets, np.repeat(runs.label[keep], lengths)


# --- backdrop model ----------------------------------------------------------------------


def _terms(degree: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of u**i * v**j for a polynomial surface of the given degree."""
    return [(total - j, j) for total in range(degree + 1) for j in range(total + 1)]


_MAX_TERMS = len(_terms(_MAX_DEGREE))


def _powers(x: npt.NDArray[np.float64], degree: int) -> list[npt.NDArray[np.float64]]:
    out = [np.ones_like(x)]
    for _ in range(degree):
        out.append(out[-1] * x)
    return out


def _design(
    u: npt.NDArray[np.floating[Any]], v: npt.NDArray[np.floating[Any]], degree: int
) -> npt.NDArray[np.float64]:
    pu = _powers(u.astype(np.float64), degree)
    pv = _powers(v.astype(np.float64), degree)
    return np.stack([pu[i] * pv[j] for i, j in _terms(degree)], axis=1)


def _robust_fit(
    colours: FloatArray, u: FloatArray, v: FloatArray, inliers: BoolArray, degree: int
) -> tuple[npt.NDArray[np.float64], BoolArray]:
    """Least squares with iterative outlier rejection: garment pixels on the border, dust
    and shadows are outliers to a smooth backdrop and must not bend it.

    Returns coefficients for all ``_MAX_DEGREE`` terms (unused ones zero) and the inliers.
    """
    coef = np.zeros((_MAX_TERMS, 3))
    designs = {d: _design(u, v, d) for d in {0, degree}}
    for _ in range(8):
        count = int(inliers.sum())
        if count == 0:
            coef[0] = np.median(colours, axis=0)
            return coef, inliers
        # Never more terms than the samples can pin down.
        design = designs[degree if count >= 20 * len(_terms(degree)) else 0]
        fitted, *_ = np.linalg.lstsq(design[inliers], colours[inliers], rcond=None)
        coef = np.zeros((_MAX_TERMS, 3))
        coef[: fitted.shape[0]] = fitted
        residual = colours - design @ fitted
        sigma = np.maximum(1.4826 * np.median(np.abs(residual[inliers]), axis=0), _MIN_SIGMA)
        # 4 standard deviations on three channels keeps 99.9% of Gaussian noise.
        updated = np.sqrt(((residual / sigma) ** 2).sum(axis=1)) < 4.0
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    return coef, inliers


def _surface_channel(
    coef: npt.NDArray[np.float64], channel: int, height: int, width: int
) -> FloatArray:
    """One channel of the surface on the full grid: (powers of v) @ C @ (powers of u).T,
    two thin matrix products instead of a (h*w, terms) design matrix."""
    pu = np.stack(_powers(np.linspace(-1.0, 1.0, width), _MAX_DEGREE), axis=1)
    pv = np.stack(_powers(np.linspace(-1.0, 1.0, height), _MAX_DEGREE), axis=1)
    grid = np.zeros((_MAX_DEGREE + 1, _MAX_DEGREE + 1))
    for k, (i, j) in enumerate(_terms(_MAX_DEGREE)):
        grid[j, i] = coef[k, channel]
    return ((pv @ grid) @ pu.T).astype(np.float32)


def _surface_at(
    coef: npt.NDArray[np.float64], ys: IntArray, xs: IntArray, height: int, width: int
) -> FloatArray:
    """The surface's colour at the given pixels, as an (n, 3) array."""
    u = (-1.0 + 2.0 * xs / (width - 1)) if width > 1 else np.full(xs.shape, -1.0)
    v = (-1.0 + 2.0 * ys / (height - 1)) if height > 1 else np.full(ys.shape, -1.0)
    return (_design(u, v, _MAX_DEGREE) @ coef).astype(np.float32)


def _fit_backdrop(rgb: ByteArray) -> npt.NDArray[np.float64]:
    h, w = rgb.shape[:2]
    factor = max(1, min(int(np.ceil(max(h, w) / _FIT_SIDE)), min(h, w)))
    hs, ws = h // factor, w // factor
    small = (
        rgb[: hs * factor, : ws * factor]
        .reshape(hs, factor, ws, factor, 3)
        .mean(axis=(1, 3), dtype=np.float32)
    )
    # Block centres, in the full image's [-1, 1] coordinates.
    ys = (np.arange(hs) * factor + (factor - 1) / 2.0) / max(h - 1, 1) * 2.0 - 1.0
    xs = (np.arange(ws) * factor + (factor - 1) / 2.0) / max(w - 1, 1) * 2.0 - 1.0
    v, u = np.meshgrid(ys.astype(np.float32), xs.astype(np.float32), indexing="ij")
    colours = small.reshape(-1, 3)
    u, v = u.reshape(-1), v.reshape(-1)

    band = max(2, round(_BORDER_FRACTION * min(hs, ws)))
    border = np.zeros((hs, ws), dtype=np.bool_)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    border = border.reshape(-1)

    # Start from the pixels near the border's median colour; the fit then takes over.
    edge = colours[border]
    distance = np.sqrt(((edge - np.median(edge, axis=0)) ** 2).sum(axis=1))
    start = distance <= max(3.0 * float(np.median(distance)), 12.0)
    coef, _ = _robust_fit(edge, u[border], v[border], start, degree=2)

    # Refit on every pixel of the image that matches the border model, so the surface is
    # pinned down in the middle too rather than extrapolated from the edges. The quadratic
    # misfits a real falloff by a few units, so the first selection is generous and the
    # robust fit at full degree tightens it.
    design = _design(u, v, _MAX_DEGREE)
    residual = colours - design @ coef
    sigma = np.maximum(1.4826 * np.median(np.abs(residual[border]), axis=0), _MIN_SIGMA)
    matches = np.sqrt(((residual / sigma) ** 2).sum(axis=1)) < 8.0
    coef, _ = _robust_fit(colours, u, v, matches, degree=_MAX_DEGREE)
    return coef


def _noise(residual: FloatArray, band: int) -> float:
    """Noise of one channel on the border, robust to the garment where it reaches the frame."""
    # Every other row and column: plenty of samples, a quarter of the work.
    samples = np.concatenate(
        [
            residual[:band:2, ::2].ravel(),
            residual[-band::2, ::2].ravel(),
            residual[band:-band:2, :band:2].ravel(),
            residual[band:-band:2, -band::2].ravel(),
        ]
    )
    spread = np.abs(samples)
    sigma = max(1.4826 * float(np.median(spread)), _MIN_SIGMA)
    kept = spread[spread < 4.0 * sigma]
    if kept.size >= 16:
        # The median of a 4-sigma-trimmed Gaussian is barely lower; no correction needed.
        sigma = max(1.4826 * float(np.median(kept)), _MIN_SIGMA)
    return sigma


# --- the operation -----------------------------------------------------------------------


def _clean(
    core: BoolArray, rgb: ByteArray, coef: npt.NDArray[np.float64], threshold: float
) -> tuple[BoolArray, dict[str, int]]:
    """Drop specks, fill gaps that are not backdrop, keep the garment's real openings."""
    h, w = core.shape
    pixels = h * w
    fg = _components(core, eight=True)
    stats = {"components": 0, "specks_removed": 0, "holes_filled": 0}
    if fg.count == 0:
        return core, stats
    # Dust and noise specks are tiny in absolute terms and next to nothing beside the
    # garment; separate small parts of a product (a belt, a tag) are kept.
    min_area = max(16.0, 5e-5 * pixels, 0.002 * float(fg.area.max()))
    keep = fg.area >= min_area
    stats["components"] = int(keep.sum())
    stats["specks_removed"] = int((~keep).sum())
    cleaned = np.zeros(pixels, dtype=np.bool_)
    cleaned[_run_pixels(fg, keep, w)[0]] = True
    cleaned = cleaned.reshape(h, w)

    # Enclosed backdrop-like regions are either real openings (a bag handle, the gap under
    # an arm), which show the backdrop itself, or parts of the garment whose colour came
    # close to it. The mean residual tells them apart: around zero for the backdrop.
    holes = _components(~cleaned, eight=False)
    enclosed = ~holes.touches_border
    if not enclosed.any():
        return cleaned, stats
    index, label = _run_pixels(holes, enclosed, w)
    ys, xs = np.divmod(index, w)
    flat_residual = rgb.reshape(-1, 3)[index] - _surface_at(coef, ys, xs, h, w)
    sums = np.stack(
        [np.bincount(label, weights=flat_residual[:, c], minlength=holes.count) for c in range(3)],
        axis=1,
    )
    mean_offset = np.sqrt((sums**2).sum(axis=1)) / np.maximum(holes.area, 1)
    small = holes.area <= max(64.0, 2e-4 * pixels)
    fill = enclosed & (small | (mean_offset > 0.5 * threshold))
    stats["holes_filled"] = int(fill.sum())
    fill_pixels = fill[label]
    flat = cleaned.reshape(-1)
    flat[index[fill_pixels]] = True
    return flat.reshape(h, w), stats


@dataclass(frozen=True)
class _Edge:
    """Pixels along the matte's edge, and the colours the decontamination needs there."""

    ys: IntArray
    xs: IntArray
    pixel: FloatArray  # (n, 3) observed
    garment: FloatArray  # (n, 3) garment colour nearby
    backdrop: FloatArray  # (n, 3) fitted backdrop


def _edge_matte(
    rgb: ByteArray,
    coef: npt.NDArray[np.float64],
    mask: BoolArray,
    sigma_rms: float,
    threshold: float,
    reach: int,
) -> tuple[FloatArray, _Edge]:
    """Solve alpha along the mask's edge from the pixel, the backdrop and nearby garment.

    Returns the matte and the edge pixels: those solved, and those up to ``reach`` pixels
    further out, where feathering will spread alpha and colour is needed too.
    """
    h, w = mask.shape
    alpha = mask.astype(np.float32)
    inner = _erode(mask, 3)
    band = _dilate(mask, 1) & ~inner
    near = _dilate(mask, 1 + reach) & ~inner
    rows, cols = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
    if not band.any():
        empty = np.zeros(0, dtype=np.int64)
        none = np.zeros((0, 3), dtype=np.float32)
        return alpha, _Edge(empty, empty, none, none, none)

    # The garment colour near each edge pixel: the mean of confidently-garment pixels
    # (three pixels in from the edge) within 4 pixels. Thin parts such as straps have no
    # such interior; there the faint weight on every mask pixel takes over.
    radius = 4
    y0, y1 = max(0, rows[0] - radius - 1), min(h, rows[-1] + radius + 2)
    x0, x1 = max(0, cols[0] - radius - 1), min(w, cols[-1] + radius + 2)
    crop = (slice(y0, y1), slice(x0, x1))
    weight = np.where(inner[crop], 1.0, np.where(mask[crop], 1e-3, 0.0)).astype(np.float32)
    cy, cx = np.nonzero(near[crop])
    reached = _box_sum(weight, radius)[cy, cx]
    pixel = rgb[crop][cy, cx].astype(np.float32)
    garment = pixel.copy()
    found = reached > 0
    for channel in range(3):
        total = _box_sum(rgb[crop][:, :, channel] * weight, radius)[cy, cx]
        garment[found, channel] = total[found] / reached[found]
    ys, xs = cy.astype(np.int64) + y0, cx.astype(np.int64) + x0
    backdrop = _surface_at(coef, ys, xs, h, w)

    solve = band[ys, xs]
    contrast = garment[solve] - backdrop[solve]
    norm2 = (contrast**2).sum(axis=1)
    solved = ((pixel[solve] - backdrop[solve]) * contrast).sum(axis=1) / np.maximum(norm2, 1e-6)
    solved = np.clip(solved, 0.0, 1.0)
    # Noise moves the solved alpha by about sigma / contrast: values that close to 0 or 1
    # are noise, and at low contrast the best estimate is a clean cut at one half.
    spread = sigma_rms / np.sqrt(np.maximum(norm2, 1e-6))
    snap = np.minimum(0.5, 2.5 * spread)
    solved = np.where(solved < snap, 0.0, np.where(solved > 1.0 - snap, 1.0, solved))
    # Where the garment colour is too close to the backdrop to solve for, the mask stands,
    # except for mask pixels with no solid garment in reach (a full weight of 1 means at
    # least one): their only "garment" colour is their own, close to the backdrop, which
    # is what noise that grew onto the edge looks like.
    usable = norm2 >= (2.0 * threshold) ** 2
    current = alpha[ys[solve], xs[solve]]
    fallback = np.where(reached[solve] >= 1.0, current, 0.0)
    alpha[ys[solve], xs[solve]] = np.where(usable, solved, fallback)
    return alpha, _Edge(ys, xs, pixel, garment, backdrop)


def remove_background(
    image: Image.Image,
    *,
    background: Literal["white", "transparent"] = "white",
    feather_px: float = 1.5,
    threshold: float | None = None,
    decontaminate: bool = True,
) -> BackgroundResult:
    """Cut a product out of a studio shot and put it on white or on transparency.

    ``threshold`` is the colour distance (8-bit RGB units, after 3x3 smoothing) from the
    backdrop above which a pixel is product; by default it is derived from the noise
    measured on the backdrop. ``feather_px`` is the width (at half height) of the Gaussian
    that softens the matte's edges, in pixels; 0 leaves the solved matte as it is. With
    ``decontaminate``, edge pixels have the backdrop's colour removed from them so no halo
    of it survives on white.

    The report holds the backdrop colour (its median over the frame), the spread of the
    fitted illumination, the estimated noise, the threshold used, the fraction of the image
    that is product and the fraction of the frame's outline it touches (a product cut off
    by the frame leaves less backdrop to learn from).
    """
    if feather_px < 0:
        raise ValueError("feather_px must not be negative")
    if threshold is not None and threshold <= 0:
        raise ValueError("threshold must be positive")
    if background not in ("white", "transparent"):
        raise ValueError(f"background must be 'white' or 'transparent', not {background!r}")

    source_alpha: FloatArray | None = None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        source_alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        rgb = np.asarray(rgba.convert("RGB"))
    else:
        rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]

    # Channel by channel, and only ever one full-size float image per step: a 40-megapixel
    # upload must not need gigabytes.
    coef = _fit_backdrop(rgb)
    band = max(1, min(round(_BORDER_FRACTION * min(h, w)), min(h, w) // 3))
    sigma = np.zeros(3)
    smooth_sigma = np.zeros(3)
    distance2 = np.zeros((h, w), dtype=np.float32)
    for channel in range(3):
        residual = rgb[:, :, channel].astype(np.float32)
        residual -= _surface_channel(coef, channel, h, w)
        sigma[channel] = _noise(residual, band)
        # 3x3 smoothing cuts the noise threefold, so the garment can be told from the
        # backdrop at a third of the contrast; the edges it blurs are solved separately.
        smoothed = _box_sum(residual, 1)
        del residual
        smoothed *= 1.0 / 9.0
        smooth_sigma[channel] = _noise(smoothed, band)
        distance2 += np.square(smoothed, out=smoothed)
        del smoothed
    sigma_rms = float(np.sqrt((sigma**2).mean()))
    if threshold is None:
        threshold = max(_NOISE_MULTIPLE * float(np.sqrt((smooth_sigma**2).sum())), _MIN_THRESHOLD)
    core = distance2 > threshold**2
    del distance2

    mask, stats = _clean(core, rgb, coef, threshold)
    feather_sigma = feather_px / 2.355  # full width at half maximum = 2.355 sigma
    reach = _gaussian_radius(feather_sigma) if feather_px > 0 else 0
    solved, edge = _edge_matte(rgb, coef, mask, sigma_rms, threshold, reach)
    alpha = np.clip(_gaussian(solved, feather_sigma), 0.0, 1.0) if feather_px > 0 else solved

    colour = edge.pixel
    if decontaminate and edge.ys.size:
        # Observed = a * garment + (1 - a) * backdrop, so the garment's own colour is
        # recovered by removing the backdrop's share. Where alpha is small that division
        # amplifies noise, so it blends towards the garment colour seen nearby.
        a_solved = solved[edge.ys, edge.xs]
        colour = edge.pixel.copy()
        partial = (a_solved > 0.0) & (a_solved < 1.0)
        a = np.maximum(a_solved[partial], 1e-3)[:, None]
        bg = edge.backdrop[partial]
        unmixed = bg + (edge.pixel[partial] - bg) / a
        trust = np.clip((a - 0.2) / 0.6, 0.0, 1.0)
        colour[partial] = np.clip(trust * unmixed + (1.0 - trust) * edge.garment[partial], 0, 255)
        # Feathering gives some alpha to pixels outside the solved matte; they take the
        # nearby garment colour rather than the backdrop's.
        spread = (a_solved == 0.0) & (alpha[edge.ys, edge.xs] > 0.0)
        colour[spread] = edge.garment[spread]
    if source_alpha is not None:
        alpha = alpha * source_alpha

    alpha8 = np.rint(alpha * 255.0).astype(np.uint8)
    del alpha, solved
    opacity = alpha8.astype(np.float32) / 255.0
    white = background == "white"
    out = np.empty((h, w, 3 if white else 4), dtype=np.uint8)
    backing = 255.0 * (1.0 - opacity) if white else None
    clear = alpha8 == 0
    for channel in range(3):
        plane = rgb[:, :, channel].astype(np.float32)
        plane[edge.ys, edge.xs] = colour[:, channel]
        if backing is not None:
            plane *= opacity
            plane += backing
        else:
            # Fully transparent pixels carry white, so viewers that ignore alpha show a
            # clean backdrop and the file compresses well.
            plane[clear] = 255.0
        out[:, :, channel] = np.rint(plane)
    if not white:
        out[:, :, 3] = alpha8

    solid = alpha8 > 127
    frame = np.concatenate([solid[0], solid[-1], solid[1:-1, 0], solid[1:-1, -1]])
    # The surface is smooth: a sparse grid describes it as well as every pixel does.
    gy, gx = np.meshgrid(
        np.linspace(0, h - 1, min(h, 64)).astype(np.int64),
        np.linspace(0, w - 1, min(w, 64)).astype(np.int64),
        indexing="ij",
    )
    coarse = _surface_at(coef, gy.ravel(), gx.ravel(), h, w)
    centre = np.median(coarse, axis=0)
    luminance = coarse @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    report: dict[str, Any] = {
        "backdrop_rgb": [round(float(c), 1) for c in centre],
        "backdrop_spread": round(float(luminance.max() - luminance.min()), 1),
        "noise": round(sigma_rms, 2),
        "noise_rgb": [round(float(s), 2) for s in sigma],
        "threshold": round(float(threshold), 2),
        "foreground_fraction": round(float(solid.mean()), 4),
        "frame_contact": round(float(frame.mean()), 4),
        **stats,
    }
    return BackgroundResult(
        image=Image.fromarray(out), alpha=Image.fromarray(alpha8), report=report
    )
