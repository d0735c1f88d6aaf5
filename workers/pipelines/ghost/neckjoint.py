"""The studio "neck joint": place a real photo of the garment's inside into the neck opening.

Studios shoot a second frame with the mannequin's neck piece removed (or the garment turned
so its inner back shows) from the same camera position. The two frames share everything around
the neck, so that shared content gives the transform from the interior shot to the main one:

1. **Features** — SIFT keypoints, Lowe's ratio test, a RANSAC homography polished by least
   squares on its inliers; accepted only with enough inliers and a plausible, non-degenerate
   transform.
2. **Fallback for low-texture garments** — phase correlation between the interior shot and an
   equally sized window of the main photo around the neck gives a translation, then ECC
   refines it to an affine transform. This assumes the shot is roughly framed on the neck at the
   same scale, which a tripod-mounted second frame is.

The warped interior fills the hidden region wherever it reaches (after a gain/offset colour
match on the garment both frames show); only the rest is left for generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from workers.pipelines.ghost.segmentation import Mask, RGBArray, dilate, erode

Method = Literal["features", "ecc", "phase"]

# A feature homography needs at least this many RANSAC inliers, and this inlier fraction.
MIN_INLIERS = 12
MIN_INLIER_RATIO = 0.25
# ECC correlation below this keeps the plain phase-correlation translation.
MIN_ECC_CORRELATION = 0.6


class AlignmentError(ValueError):
    """The interior photo could not be aligned with the main photo."""


@dataclass(frozen=True)
class Alignment:
    """A transform from interior-photo pixels to main-photo pixels."""

    homography: NDArray[np.float64]  # 3x3
    method: Method
    inliers: int  # RANSAC inliers (features); 0 otherwise
    score: float  # inlier ratio (features), ECC correlation or phase-correlation response

    def project(self, points: NDArray[np.float64]) -> NDArray[np.float64]:
        """Map (n, 2) interior points into the main photo."""
        pts = np.asarray(points, np.float64).reshape(-1, 1, 2)
        return np.asarray(cv2.perspectiveTransform(pts, self.homography), np.float64).reshape(-1, 2)


@dataclass(frozen=True)
class NeckJoint:
    """The main photo with the interior composited, and what of the hidden region it covered."""

    image: RGBArray
    covered: Mask  # part of the hidden region now showing the real interior
    remaining: Mask  # hidden & ~covered: still to be generated
    alignment: Alignment


def _grey(rgb: RGBArray) -> NDArray[np.uint8]:
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), np.uint8)


def _plausible(h: NDArray[np.float64], interior_shape: tuple[int, int]) -> bool:
    """Reject degenerate homographies: extreme scale, mirroring or strong perspective."""
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-9:
        return False
    hn = h / h[2, 2]
    det = float(np.linalg.det(hn[:2, :2]))
    if not 0.2 < det < 5.0:
        return False
    ih, iw = interior_shape
    corners = np.array([[0, 0], [iw, 0], [iw, ih], [0, ih]], np.float64).reshape(-1, 1, 2)
    w = corners.reshape(-1, 2) @ hn[2, :2] + hn[2, 2]
    return bool(np.all(w > 0.5) and np.all(w < 2.0))


def _features(
    main: NDArray[np.uint8], interior: NDArray[np.uint8], search: Mask | None
) -> Alignment | None:
    detector = cv2.SIFT.create(nfeatures=1500, contrastThreshold=0.02)
    main_mask = search.astype(np.uint8) * 255 if search is not None else None
    kp_i, des_i = detector.detectAndCompute(interior, None)
    kp_m, des_m = detector.detectAndCompute(main, main_mask)
    if len(kp_i) < 4 or len(kp_m) < 4:
        return None
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    pairs = matcher.knnMatch(des_i, des_m, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = np.array([kp_i[m.queryIdx].pt for m in good], np.float64).reshape(-1, 1, 2)
    dst = np.array([kp_m[m.trainIdx].pt for m in good], np.float64).reshape(-1, 1, 2)
    h_raw, inlier_raw = cv2.findHomography(
        src, dst, cv2.RANSAC, 2.5, maxIters=4000, confidence=0.999
    )
    # OpenCV returns None for both when no model is found; asarray(None) has shape ().
    h = np.asarray(h_raw, np.float64)
    if h.shape != (3, 3):
        return None
    inl = np.asarray(inlier_raw, np.uint8).ravel().astype(bool)
    n_in = int(inl.sum())
    if n_in >= 8:
        # Least-squares polish on the inliers only.
        refined = np.asarray(cv2.findHomography(src[inl], dst[inl], 0)[0], np.float64)
        if refined.shape == (3, 3):
            h = refined
    ratio = n_in / len(good)
    if n_in < MIN_INLIERS or ratio < MIN_INLIER_RATIO or not _plausible(h, interior.shape[:2]):
        return None
    return Alignment(h / h[2, 2], "features", n_in, ratio)


def _window(
    main_shape: tuple[int, int], size: tuple[int, int], search: Mask | None
) -> tuple[int, int]:
    """Top-left corner of a size-(h, w) window centred on the search region, inside the image."""
    mh, mw = main_shape
    h, w = size
    if search is not None and search.any():
        ys, xs = np.nonzero(search)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    else:
        cy, cx = mh / 2, mw / 2
    y0 = int(np.clip(round(cy - h / 2), 0, max(mh - h, 0)))
    x0 = int(np.clip(round(cx - w / 2), 0, max(mw - w, 0)))
    return y0, x0


def _phase_ecc(
    main: NDArray[np.uint8],
    interior: NDArray[np.uint8],
    search: Mask | None,
    exclude: Mask | None,
) -> Alignment:
    ih, iw = interior.shape
    mh, mw = main.shape
    filled = main
    if exclude is not None and exclude.any():
        # What the main photo shows there (the mannequin) is exactly what the interior shot
        # replaces; a neutral fill keeps it from dominating the correlation.
        filled = np.asarray(cv2.inpaint(main, exclude.astype(np.uint8), 3, cv2.INPAINT_TELEA))
    h, w = min(ih, mh), min(iw, mw)
    y0, x0 = _window((mh, mw), (h, w), search)
    win = filled[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    hann = np.asarray(cv2.createHanningWindow((w, h), cv2.CV_32F), np.float32)
    (dx, dy), response = cv2.phaseCorrelate(interior[:h, :w].astype(np.float32), win, hann)
    # The window shows the interior moved by (dx, dy).
    base = np.array([[1.0, 0.0, x0 + dx], [0.0, 1.0, y0 + dy], [0.0, 0.0, 1.0]])
    phase = Alignment(base, "phase", 0, float(response))

    # ECC with the interior as template and the main photo as input: the warp it finds maps
    # interior pixels to main pixels, and the mask drops the main photo's excluded region.
    valid = (~exclude).astype(np.uint8) if exclude is not None else np.ones((mh, mw), np.uint8)
    warp = base[:2].astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-5)
    corr = 0.0
    try:
        for scale, motion in ((0.5, cv2.MOTION_EUCLIDEAN), (1.0, cv2.MOTION_AFFINE)):
            tpl = _scaled(interior, scale)
            img = _scaled(main, scale)
            msk = _scaled(valid, scale, nearest=True)
            w_s = warp.copy()
            w_s[:, 2] *= scale
            corr, found = cv2.findTransformECC(tpl, img, w_s, motion, criteria, msk, 5)
            warp = np.asarray(found, np.float32)
            warp[:, 2] /= scale
    except cv2.error:
        return phase
    hom = np.vstack([warp.astype(np.float64), [0.0, 0.0, 1.0]])
    if corr < MIN_ECC_CORRELATION or not _plausible(hom, interior.shape):
        return phase
    return Alignment(hom, "ecc", 0, float(corr))


def _scaled(img: NDArray[np.uint8], scale: float, *, nearest: bool = False) -> NDArray[np.float32]:
    if scale == 1.0:
        return img.astype(np.float32)
    h, w = img.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    out = np.asarray(cv2.resize(img, size, interpolation=interp))
    return out.astype(np.uint8 if nearest else np.float32) if nearest else out.astype(np.float32)


def align_interior(
    main: RGBArray,
    interior: RGBArray,
    *,
    search: Mask | None = None,
    exclude: Mask | None = None,
) -> Alignment:
    """Find the transform taking the interior photo onto the main photo.

    ``search`` limits where in the main photo features are looked for (the neck area) and
    centres the low-texture fallback's window; ``exclude`` is what the main photo shows
    differently from the interior shot (the hidden region), left out of the matching.
    """
    g_main, g_int = _grey(main), _grey(interior)
    where = search
    if exclude is not None:
        where = (search if search is not None else np.ones(exclude.shape, bool)) & ~exclude
    found = _features(g_main, g_int, where)
    if found is not None:
        return found
    return _phase_ecc(g_main, g_int, search, exclude)


def _colour_match(
    warped: NDArray[np.float32], main: RGBArray, reference: Mask
) -> NDArray[np.float32]:
    """Per-channel gain so the interior's exposure matches the main photo's.

    A gain from the channel means, not a full mean/variance match: on a plain garment the
    variance is mostly noise and would distort everything that is not the garment's colour.
    """
    if reference.sum() < 50:
        return warped
    src = warped[reference].mean(0)
    dst = main[reference].astype(np.float32).mean(0)
    gain = np.clip(dst / np.maximum(src, 1.0), 0.7, 1.4)
    return np.asarray(np.clip(warped * gain, 0.0, 255.0), np.float32)


def apply_neck_joint(
    main: RGBArray,
    interior: RGBArray,
    hidden: Mask,
    *,
    garment: Mask | None = None,
    alignment: Alignment | None = None,
    search: Mask | None = None,
) -> NeckJoint:
    """Warp the interior photo into the main one and fill the hidden region where it reaches.

    ``garment`` (the visible garment) is where both frames should agree; a ring of it around the
    hidden region drives the colour match. ``search`` defaults to the hidden region grown by
    its own size.
    """
    mh, mw = main.shape[:2]
    if search is None and hidden.any():
        ys, xs = np.nonzero(hidden)
        grow = int(max(np.ptp(ys), np.ptp(xs)) * 1.5) + 8
        search = dilate(hidden, grow)
    align = alignment or align_interior(main, interior, search=search, exclude=hidden)
    warped = np.asarray(
        cv2.warpPerspective(
            interior.astype(np.float32), align.homography, (mw, mh), flags=cv2.INTER_LINEAR
        ),
        np.float32,
    )
    ones = np.ones(interior.shape[:2], np.uint8)
    reach = (
        np.asarray(cv2.warpPerspective(ones, align.homography, (mw, mh), flags=cv2.INTER_NEAREST))
        > 0
    )
    # Interpolation at the warped photo's own border mixes in black: stay clear of it.
    reach = erode(reach, 2) if reach.any() else reach
    if garment is not None:
        ring = dilate(hidden, 12) & ~dilate(hidden, 2) & garment & reach
        warped = _colour_match(warped, main, ring)
    covered = hidden & reach
    weight = covered.astype(np.float32)
    weight = np.asarray(cv2.GaussianBlur(weight, (0, 0), 0.8), np.float32) * reach
    weight[covered & erode(covered, 1)] = 1.0
    out = main.astype(np.float32) * (1 - weight[..., None]) + warped * weight[..., None]
    image = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return NeckJoint(image, covered, hidden & ~covered, align)
