"""Inner garment reconstruction (IGR): where the hidden inside of the garment must appear.

Once the body is taken out of a photo, every place where it left the garment becomes an
*opening* through which a ghost-mannequin image shows the garment's inside: the back of the
collar through the neck opening, the inside of each sleeve at the cuff, the inside back of the
hem (or of each trouser leg). This module finds those openings from the garment and body masks
alone and draws the region to reconstruct at each:

* an opening is a stretch where the body touches the garment, split by the direction the
  garment's edge faces there and rejoined where it turns less than about 75 degrees; its
  outward direction runs from the garment's pixels to the body's pixels around it. Slivers
  are dropped unless a limb runs far out of them (a stand's pole, an ankle); body that only
  lies along an edge (an arm beside a dress) is no opening: at a real one the body continues
  outwards and the contact spans a good part of the edge from corner to corner;
* classification uses that direction and the garment's geometry: an upward opening near the
  top is the neck (the waist for trousers and skirts), and body seen all round through a
  hole in the garment's top is the neck too (a hood's inside); a downward opening in the
  middle of a top or dress is the hem; openings off to the sides are sleeves (armholes for a
  sleeveless top); each trouser leg has its own hem;
* sleeve and hem regions are half-ellipses beyond the garment's edge line, as wide as the
  garment is across the opening, as deep as a tube seen from slightly above
  (:data:`TUBE_DEPTH_RATIO`; a torso hem is flatter, :data:`HEM_DEPTH_RATIO`);
* the neck region is the body enclosed by the neckline plus the back of the collar: a
  half-ellipse spanning the collar tips, rising :data:`NECK_BACK_RATIO` of the half-width above
  them (:data:`WAIST_BACK_RATIO` for a waistband), kept within the garment's outline (its
  convex hull): never over the head;
* every region is at least :data:`MIN_DEPTH` of the image diagonal deep.

:func:`infer_garment_type` tells tops, sleeveless tops, hoodies, dresses, skirts and trousers
apart from the silhouette and where the body meets it; a caller's type overrides it.

Body outside all regions is removed (it becomes backdrop). The inpaint mask is the regions
dilated a few pixels into the garment, so generated content blends across the seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from workers.pipelines.ghost.segmentation import Mask, dilate, disk, remove_small

GarmentType = Literal["top", "sleeveless", "hoodie", "dress", "skirt", "trousers"]
GARMENT_TYPES: tuple[GarmentType, ...] = (
    "top",
    "sleeveless",
    "hoodie",
    "dress",
    "skirt",
    "trousers",
)
OpeningKind = Literal["neck", "sleeve", "armhole", "hem"]
Vec = tuple[float, float]

# Depth of each hidden half-ellipse as a fraction of its half-width.
NECK_BACK_RATIO = 0.35
WAIST_BACK_RATIO = 0.13
TUBE_DEPTH_RATIO = 0.3
HEM_DEPTH_RATIO = 0.12
# A dress is at least this many times as tall (from its shoulders) as it is wide at mid height.
DRESS_ASPECT = 2.45
# ... or this many times, with a hem at least DRESS_FLARE times its waist (an A-line dress).
FLARED_DRESS_ASPECT, DRESS_FLARE = 1.9, 1.4
# Every hidden region is at least this deep (share of the image diagonal): a cuff or hem
# seen nearly edge-on still shows a band of its inside.
MIN_DEPTH = 0.008


@dataclass(frozen=True)
class Opening:
    """One place where the body leaves the garment, and the hidden region drawn there."""

    kind: OpeningKind
    centre: Vec  # (x, y) midpoint of the garment's edge across the opening
    along: Vec  # unit vector along that edge
    outward: Vec  # unit normal pointing out of the garment, towards the body
    half_width: float
    region: Mask


@dataclass(frozen=True)
class IgrRegions:
    """Named hidden regions, the body to remove, and the combined inpaint mask."""

    neck: Mask  # neck opening + back of the collar (waistband's inner back for trousers)
    sleeves: Mask
    hem: Mask
    remove: Mask  # body outside every hidden region: becomes backdrop
    hidden: Mask  # neck | sleeves | hem
    inpaint: Mask  # hidden, dilated into the garment for seam blending
    openings: tuple[Opening, ...]
    garment_type: GarmentType
    seam_px: int  # how far the inpaint mask reaches into the garment


def _runs(row: NDArray[np.bool_]) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], row, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _row_profile(garment: Mask) -> tuple[int, int, NDArray[np.int64]]:
    """(top, bottom, garment pixels per row from top to bottom)."""
    rows = np.flatnonzero(garment.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    return top, bottom, garment[top : bottom + 1].sum(axis=1).astype(np.int64)


def infer_garment_type(garment: Mask, body: Mask | None = None) -> GarmentType:
    """Classify a garment silhouette by its geometry (and where the body meets it).

    * trousers: most rows of the lower third split into two legs around a narrow gap;
    * the *shoulder line* is the first row as full as the upper body; a solid part above it,
      tall and wide enough, is a hood (a collar or straps are thin or short);
    * skirt: no shoulders at all — the top edge is already as wide as the body below it;
    * dress: from the shoulders down at least :data:`DRESS_ASPECT` times as tall as it is
      wide at mid height, or :data:`FLARED_DRESS_ASPECT` times with a flared skirt;
    * sleeveless: body (arms, a mannequin's shoulders) meets the garment's sides in its
      upper third;
    * otherwise a top.
    """
    ys, xs = np.nonzero(garment)
    if len(ys) == 0:
        return "top"
    top, bottom, counts = _row_profile(garment)
    left, right = int(xs.min()), int(xs.max())
    height, width = bottom - top + 1, right - left + 1
    cx = (left + right) / 2
    legs = 0
    rows = range(bottom - height // 3, bottom + 1)
    for y in rows:
        runs = [r for r in _runs(garment[y]) if r[1] - r[0] >= 0.05 * width]
        if len(runs) == 2:
            gap_mid = (runs[0][1] + runs[1][0]) / 2
            gap = runs[1][0] - runs[0][1]
            if abs(gap_mid - cx) < 0.1 * width and gap < 0.35 * width:
                legs += 1
    if legs >= 0.6 * len(rows):
        return "trousers"
    extents = np.zeros(height, np.int64)
    for i, y in enumerate(range(top, bottom + 1)):
        cols = np.flatnonzero(garment[y])
        extents[i] = int(cols[-1] - cols[0] + 1) if len(cols) else 0
    mid = extents[round(0.3 * height) : round(0.6 * height) + 1]
    body_width = float(np.median(mid)) if len(mid) else float(extents.max())
    full = np.flatnonzero(extents >= 0.7 * body_width)
    shoulder = int(full[0]) if len(full) else 0
    first = counts[: max(1, round(0.03 * height))]
    if shoulder <= 0.03 * height and float(np.median(first)) >= 0.85 * body_width:
        return "skirt"
    # A hood: a solid part above the shoulder line (two straps far apart are no hood) that
    # rises above the body at the neck (a head above a garment's neckline is no hood).
    above_counts, above_extents = counts[:shoulder], extents[:shoulder]
    hood = (
        shoulder >= 0.12 * height
        and float(above_counts.mean()) >= 0.5 * float(np.maximum(above_extents, 1).mean())
        and float(above_extents.max()) <= 0.8 * body_width
        and (body is None or _garment_above_body(garment, body, top, height))
    )
    if hood:
        return "hoodie"
    below = counts[shoulder:]
    length = len(below)
    mid_body = below[round(0.45 * length) : round(0.65 * length) + 1]
    waist = below[round(0.3 * length) : round(0.6 * length) + 1]
    hem = below[round(0.9 * length) : round(0.97 * length) + 1]
    if len(mid_body) and len(waist) and len(hem):
        aspect = length / float(np.median(mid_body))
        # An A-line skirt part: the hem clearly wider than the waist.
        flare = float(np.median(hem)) / max(float(waist.min()), 1.0)
        if aspect >= DRESS_ASPECT or (aspect >= FLARED_DRESS_ASPECT and flare >= DRESS_FLARE):
            return "dress"
    if body is not None and _body_at_upper_sides(garment, body, top, shoulder, height):
        return "sleeveless"
    return "top"


def _garment_above_body(garment: Mask, body: Mask, top: int, height: int) -> bool:
    """Garment over the body at the neck: columns where, going down from the garment's top,
    garment comes first and body after it, within the upper half."""
    y1 = top + max(2, round(0.5 * height))
    g, b = garment[top:y1], body[top:y1]
    has_g, has_b = g.any(axis=0), b.any(axis=0)
    first_g = np.where(has_g, g.argmax(axis=0), g.shape[0])
    first_b = np.where(has_b, b.argmax(axis=0), g.shape[0])
    over = has_g & has_b & (first_g + 0.08 * height <= first_b)
    return int(over.sum()) >= 0.1 * int(has_g.sum())


def _body_at_upper_sides(garment: Mask, body: Mask, top: int, shoulder: int, height: int) -> bool:
    """Body beside both outer sides of the garment's upper third (arms out of armholes)."""
    y0, y1 = top + shoulder, top + shoulder + max(2, round(0.25 * height))
    h, w = garment.shape
    reach = max(2, round(0.01 * float(np.hypot(h, w))))
    sides = 0
    band = garment[y0:y1]
    if not band.any():
        return False
    cols = np.flatnonzero(band.any(axis=0))
    lo, hi = int(cols[0]), int(cols[-1])
    quarter = max(2, (hi - lo) // 4)
    near = dilate(garment, reach)[y0:y1] & body[y0:y1]
    for a, b in ((max(0, lo - reach), lo + quarter), (hi - quarter, min(w, hi + reach + 1))):
        if near[:, a:b].sum() >= 0.15 * (y1 - y0) * reach:
            sides += 1
    return sides == 2


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.array([0.0, -1.0])


def half_ellipse(
    shape: tuple[int, int], centre: Vec, along: Vec, outward: Vec, a: float, b: float
) -> Mask:
    """Pixels of the half of an ellipse on the ``outward`` side of its major axis."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    s = dx * along[0] + dy * along[1]
    t = dx * outward[0] + dy * outward[1]
    a, b = max(a, 0.5), max(b, 0.5)
    return np.asarray(((s / a) ** 2 + (t / b) ** 2 <= 1.0) & (t >= -0.5))


def _span(
    garment: Mask,
    inside: NDArray[np.float64],
    outside: NDArray[np.float64],
    along: NDArray[np.float64],
) -> tuple[float, float]:
    """Extent of the garment's edge along ``along``, walked on both sides of the edge.

    A step counts while the garment is set at the inner point and clear at the outer one, so
    the walk stops where the edge ends (a sleeve's cuff meeting the bodice, a hem's corner).
    Gaps of up to 2 px are bridged.
    """
    h, w = garment.shape
    limits = []
    for sign in (-1.0, 1.0):
        t, last, gap = 0.0, 0.0, 0
        while gap <= 2:
            t += 1.0
            xi, yi = np.round(inside + sign * t * along).astype(int)
            xo, yo = np.round(outside + sign * t * along).astype(int)
            if not (0 <= xi < w and 0 <= yi < h):
                break
            outer_clear = not (0 <= xo < w and 0 <= yo < h) or not garment[yo, xo]
            if garment[yi, xi] and outer_clear:
                last, gap = t, 0
            else:
                gap += 1
        limits.append(sign * last)
    return limits[0], limits[1]


@dataclass
class _Contact:
    points: NDArray[np.float64]  # (n, 2) x, y
    centre: NDArray[np.float64]
    outward: NDArray[np.float64]
    along: NDArray[np.float64]


# An opening shorter than this share of the image diagonal is a sliver (an edge's
# anti-aliasing, a print's outline), not a place where the body leaves the garment.
MIN_OPENING_LENGTH = 0.02
# A sleeve or leg opening covers at least this share of the garment edge it lies on (a
# wrist or an ankle is narrower than its cuff or hem, an arm lying along a side is far more).
MIN_EDGE_COVER = 0.25
# Neighbouring stretches of contact whose edges face within about 75 degrees of each other
# are one opening.
MAX_TURN_COS = 0.26
# Where the body leaves the garment it continues outwards at least this share of the
# opening's width; body that only lies along the garment's edge (an arm beside a dress) is
# no opening.
MIN_PROTRUSION = 0.35


def _outward_normals(
    garment: Mask, sigma: float
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Unit vectors pointing out of the garment, per pixel (from its smoothed mask)."""
    smooth = cv2.GaussianBlur(garment.astype(np.float32), (0, 0), sigma)
    gx = np.asarray(cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3), np.float32)
    gy = np.asarray(cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3), np.float32)
    norm = np.maximum(np.sqrt(gx * gx + gy * gy), 1e-6)
    return np.asarray(-gx / norm, np.float32), np.asarray(-gy / norm, np.float32)


def _protrusion(
    body: Mask,
    centre: NDArray[np.float64],
    along: NDArray[np.float64],
    outward: NDArray[np.float64],
    half: float,
    limit: float = 0.0,
) -> float:
    """How far the body reaches outwards beyond an opening, across the opening's width."""
    h, w = body.shape
    reach = max(2.0 * half + 4.0, limit)
    x0, x1 = max(0, int(centre[0] - reach)), min(w, int(centre[0] + reach) + 1)
    y0, y1 = max(0, int(centre[1] - reach)), min(h, int(centre[1] + reach) + 1)
    gy, gx = np.mgrid[y0:y1, x0:x1]
    dx, dy = gx - centre[0], gy - centre[1]
    s = dx * along[0] + dy * along[1]
    t = dx * outward[0] + dy * outward[1]
    sel = body[y0:y1, x0:x1] & (np.abs(s) <= half) & (t > 0)
    if not sel.any():
        return 0.0
    return float(np.quantile(t[sel], 0.9))


def _contacts(garment: Mask, body: Mask, reach: int) -> list[_Contact]:
    """Stretches of the garment's edge where the body leaves it, one per direction.

    Touching pixels are grouped by the direction the garment's edge faces there (up, down,
    left, right), so a neckline and the arm below the shoulder are separate; slivers and
    body that does not continue outwards are dropped.
    """
    h, w = garment.shape
    diag = float(np.hypot(h, w))
    touch = body & dilate(garment, reach)
    touch = remove_small(touch, 4)
    nx, ny = _outward_normals(garment, max(2.0, 0.006 * diag))
    # Normals at the touching pixels come from the nearest garment edge.
    up = ny < -0.35
    down = ny > 0.5
    left = ~up & ~down & (nx < 0)
    right = ~up & ~down & (nx >= 0)
    min_len = MIN_OPENING_LENGTH * diag
    # Pieces per direction, then rejoined where neighbouring pieces face within
    # MAX_TURN of each other: a cuff's bottom and sides are one opening, a neckline and the
    # arm below the shoulder are two.
    pieces: list[Mask] = []
    normals: list[NDArray[np.float64]] = []
    for direction in (up, down, left, right):
        part = touch & dilate(direction & dilate(garment, 1) & ~garment, reach)
        n, labels, _, _ = cv2.connectedComponentsWithStats(part.astype(np.uint8), connectivity=8)
        lab = np.asarray(labels)
        for i in range(1, n):
            piece = lab == i
            pieces.append(piece)
            normals.append(_unit(np.array([float(nx[piece].mean()), float(ny[piece].mean())])))
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grown = [dilate(p, 1) for p in pieces]
    for i in range(len(pieces)):
        for j in range(i + 1, len(pieces)):
            if float(normals[i] @ normals[j]) >= MAX_TURN_COS and (grown[i] & pieces[j]).any():
                parent[find(i)] = find(j)
    groups: dict[int, Mask] = {}
    for i, piece in enumerate(pieces):
        root = find(i)
        groups[root] = groups[root] | piece if root in groups else piece
    out = []
    for group in groups.values():
        ys, xs = np.nonzero(group)
        pts = np.stack([xs, ys], axis=1).astype(np.float64)
        extent = float(np.ptp(pts, axis=0).max()) + 1.0
        centre = pts.mean(0)
        radius = max(8.0, 0.75 * extent)
        x0, x1 = max(0, int(centre[0] - radius)), min(w, int(centre[0] + radius) + 1)
        y0, y1 = max(0, int(centre[1] - radius)), min(h, int(centre[1] + radius) + 1)
        win_b = body[y0:y1, x0:x1]
        win_g = garment[y0:y1, x0:x1]
        gy, gx = np.mgrid[y0:y1, x0:x1]
        inside = (gx - centre[0]) ** 2 + (gy - centre[1]) ** 2 <= radius**2
        bsel, gsel = win_b & inside, win_g & inside
        if not bsel.any() or not gsel.any():
            continue
        b_mean = np.array([gx[bsel].mean(), gy[bsel].mean()])
        g_mean = np.array([gx[gsel].mean(), gy[gsel].mean()])
        outward = _unit(b_mean - g_mean)
        along = np.array([-outward[1], outward[0]])
        half = 0.5 * float(np.ptp(pts @ along)) + 1.0
        # A neck is as wide as the shoulders and its stub may be short: only sideways and
        # downward contacts must show the body continuing outwards.
        upward = outward[1] < -0.5
        reach_out = _protrusion(body, centre, along, outward, half, 4.0 * min_len)
        # A thin body part running far out (a stand's pole, an ankle) is an opening however
        # short the contact; otherwise short contacts are slivers.
        long_limb = reach_out >= max(3.0 * min_len, 2.0 * half)
        if extent < min_len and not long_limb:
            continue
        if not upward and reach_out < MIN_PROTRUSION * 2 * half:
            continue
        out.append(_Contact(pts, centre, outward, along))
    return out


def _inside(mask: Mask, point: NDArray[np.float64]) -> bool:
    x, y = round(float(point[0])), round(float(point[1]))
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and bool(mask[y, x])


def _enclosed(garment: Mask, body: Mask) -> Mask:
    """Body in holes of the garment: components that touch neither the frame nor the body
    outside the garment's outline."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(body)
    h, w = body.shape
    lab = np.asarray(labels)
    outside = ~garment & ~body
    touching = np.unique(lab[dilate(outside, 1) & body])
    keep = np.ones(n, bool)
    keep[0] = False
    keep[touching] = False
    st = np.asarray(stats)
    for i in range(1, n):
        x, y, bw, bh, _ = st[i]
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            keep[i] = False
    return np.asarray(keep[lab])


def _merge(contacts: list[_Contact]) -> _Contact:
    pts = np.concatenate([c.points for c in contacts])
    outward = _unit(sum((c.outward * len(c.points) for c in contacts), np.zeros(2)))
    return _Contact(pts, pts.mean(0), outward, np.array([-outward[1], outward[0]]))


def _edge_opening(kind: OpeningKind, contact: _Contact, garment: Mask, ratio: float) -> Opening:
    """A sleeve/hem/waist opening: a half-ellipse beyond the garment's edge line."""
    inside = contact.centre - 3.0 * contact.outward
    outside = contact.centre + 2.0 * contact.outward
    t0, t1 = _span(garment, inside, outside, contact.along)
    mid = contact.centre + 0.5 * (t0 + t1) * contact.along - 1.0 * contact.outward
    a = max((t1 - t0) / 2 + 0.5, 1.0)
    centre = (float(mid[0]), float(mid[1]))
    along = (float(contact.along[0]), float(contact.along[1]))
    outward = (float(contact.outward[0]), float(contact.outward[1]))
    depth = max(ratio * a, MIN_DEPTH * float(np.hypot(*garment.shape)))
    region = half_ellipse(garment.shape, centre, along, outward, a, depth) & ~garment
    return Opening(kind, centre, along, outward, a, region)


def _neck_opening(
    contact: _Contact, garment: Mask, body: Mask, garment_type: GarmentType
) -> Opening:
    """The top opening: enclosed body below the collar tips plus the back of the collar."""
    if garment_type in ("trousers", "skirt"):
        # A waistband: the inner back spans the whole waist, wherever the form touches it.
        opening = _edge_opening("neck", contact, garment, WAIST_BACK_RATIO)
        enclosed = _hull(contact.points, garment.shape) & body
        return Opening(
            "neck",
            opening.centre,
            opening.along,
            opening.outward,
            opening.half_width,
            opening.region | enclosed,
        )
    # The neckline is a notch in the garment's convex hull; the hull edge bridging it runs
    # from collar tip to collar tip. Without such a notch the contact itself stands in.
    notch = _notch(garment, contact)
    points = contact.points
    if notch is not None:
        ys, xs = np.nonzero(notch)
        points = np.stack([xs, ys], axis=1).astype(np.float64)
    proj_u = points @ contact.along
    tip_a = points[int(np.argmin(proj_u))]
    tip_b = points[int(np.argmax(proj_u))]
    mid = (tip_a + tip_b) / 2
    along_vec = _unit(tip_b - tip_a)
    outward_vec = np.array([along_vec[1], -along_vec[0]])
    if outward_vec @ contact.outward < 0:
        outward_vec = -outward_vec
    a = float(np.linalg.norm(tip_b - tip_a)) / 2 + 0.5
    centre = (float(mid[0]), float(mid[1]))
    along = (float(along_vec[0]), float(along_vec[1]))
    outward = (float(outward_vec[0]), float(outward_vec[1]))
    back = half_ellipse(garment.shape, centre, along, outward, a, NECK_BACK_RATIO * a)
    enclosed = notch if notch is not None else _hull(points, garment.shape)
    # The inside shows only within the garment's outline: never over the head or neck. Thin
    # straps do not widen that outline: between them shows the backdrop, not the inside.
    diag = float(np.hypot(*garment.shape))
    body_part = np.asarray(
        cv2.morphologyEx(garment.astype(np.uint8), cv2.MORPH_OPEN, disk(max(2, round(0.01 * diag))))
        > 0
    )
    outline = dilate(
        _garment_hull(body_part if body_part.any() else garment), max(1, round(0.004 * diag))
    )
    return Opening("neck", centre, along, outward, a, (back | enclosed) & outline & ~garment)


def _notch(garment: Mask, contact: _Contact) -> Mask | None:
    """The part of the garment's convex-hull deficiency that the neck contact lies in."""
    contours, _ = cv2.findContours(
        garment.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return None
    hull = _hull(
        np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64), garment.shape
    )
    deficiency = hull & ~garment
    n, labels, _, _ = cv2.connectedComponentsWithStats(deficiency.astype(np.uint8), connectivity=4)
    if n <= 1:
        return None
    lab = np.asarray(labels)
    xs = np.clip(np.round(contact.points[:, 0]).astype(int), 0, garment.shape[1] - 1)
    ys = np.clip(np.round(contact.points[:, 1]).astype(int), 0, garment.shape[0] - 1)
    hits = np.bincount(lab[ys, xs], minlength=n)
    hits[0] = 0
    best = int(np.argmax(hits))
    # Most of the contact must lie in it, or the neckline is not a notch (a flat top edge).
    if hits[best] < 0.5 * len(xs):
        return None
    return np.asarray(lab == best)


def _garment_hull(garment: Mask) -> Mask:
    contours, _ = cv2.findContours(
        garment.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return np.zeros_like(garment)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)
    return _hull(pts, garment.shape)


def _hull(points: NDArray[np.float64], shape: tuple[int, int]) -> Mask:
    canvas = np.zeros(shape, np.uint8)
    hull = cv2.convexHull(np.round(points).astype(np.int32))
    cv2.fillConvexPoly(canvas, np.asarray(hull, np.int32), 1)
    return canvas > 0


def reconstruct_regions(
    garment: Mask,
    body: Mask,
    *,
    garment_type: GarmentType | None = None,
    seam_px: int | None = None,
) -> IgrRegions:
    """Find the garment's openings and the hidden regions to reconstruct at each.

    ``seam_px`` is how far the inpaint mask reaches into the garment (default: about 0.6% of
    the image diagonal, at least 2 px).
    """
    h, w = garment.shape
    diag = float(np.hypot(h, w))
    reach = max(2, round(0.004 * diag))
    seam = seam_px if seam_px is not None else max(2, round(0.006 * diag))
    kind = garment_type or infer_garment_type(garment, body)
    empty = np.zeros((h, w), bool)
    ys, xs = np.nonzero(garment)
    if len(ys) == 0:
        return IgrRegions(empty, empty, empty, body.copy(), empty, empty, (), kind, seam)
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    cx = (left + right) / 2
    height, width = bottom - top + 1, right - left + 1
    legged = kind == "trousers"

    necks: list[_Contact] = []
    hems: list[_Contact] = []
    sleeves: list[_Contact] = []
    for c in _contacts(garment, body & ~_enclosed(garment, body), reach):
        oy = c.outward[1]
        if oy < -0.5 and c.centre[1] < top + 0.45 * height:
            necks.append(c)
        elif legged:
            (hems if oy > 0.3 else sleeves).append(c)
        elif oy > 0.3 and abs(c.centre[0] - cx) < 0.22 * width and c.centre[1] > top + 0.5 * height:
            hems.append(c)
        else:
            sleeves.append(c)

    openings: list[Opening] = []
    inner_neck = _enclosed(garment, body)
    inner_neck = remove_small(inner_neck, max(4, round(1e-4 * h * w)))
    if inner_neck.any():
        # Body seen through a hole in the garment's top (the hood's inside, a neckline
        # closed all round): the hole itself is the neck opening.
        iy, ix = np.nonzero(inner_neck)
        if float(iy.mean()) < top + 0.4 * height:
            centre = (float(ix.mean()), float(iy.mean()))
            half = 0.5 * float(np.ptp(ix) + 1)
            openings.append(Opening("neck", centre, (1.0, 0.0), (0.0, -1.0), half, inner_neck))
    if necks and not openings:
        # One neck: the biggest upward contact. Others (a shoulder showing above a strap) are
        # body to remove, not openings.
        neck = max(necks, key=lambda c: len(c.points) / (1.0 + abs(c.centre[0] - cx) / width))
        openings.append(_neck_opening(neck, garment, body, kind))
    if openings and openings[0].kind == "neck":
        # Contacts inside the neck opening (the sides of a deep V) belong to it.
        near_neck = dilate(openings[0].region, 2 * reach)
        sleeves = [c for c in sleeves if not _inside(near_neck, c.centre)]
        hems = [c for c in hems if not _inside(near_neck, c.centre)]
    side_kind: OpeningKind = "armhole" if kind == "sleeveless" else "sleeve"
    min_half = 0.5 * MIN_OPENING_LENGTH * diag

    def spans_edge(c: _Contact, o: Opening) -> bool:
        # An opening spans the garment's edge from corner to corner (a cuff across the
        # sleeve); body touching part of a longer edge lies beside the garment.
        covered = float(np.ptp(c.points @ c.along)) + 1.0
        return o.half_width >= min_half and covered >= MIN_EDGE_COVER * 2 * o.half_width

    for c in sleeves:
        o = _edge_opening(side_kind, c, garment, TUBE_DEPTH_RATIO)
        if spans_edge(c, o):
            openings.append(o)
    if legged:
        for c in hems:
            o = _edge_opening("hem", c, garment, TUBE_DEPTH_RATIO)
            if spans_edge(c, o):
                openings.append(o)
    elif hems:
        openings.append(_edge_opening("hem", _merge(hems), garment, HEM_DEPTH_RATIO))

    masks: dict[OpeningKind, Mask] = {
        "neck": empty.copy(),
        "sleeve": empty.copy(),
        "armhole": empty.copy(),
        "hem": empty.copy(),
    }
    for o in openings:
        masks[o.kind] |= o.region
    hidden = masks["neck"] | masks["sleeve"] | masks["armhole"] | masks["hem"]
    inpaint = hidden | (dilate(hidden, seam) & garment)
    return IgrRegions(
        neck=masks["neck"],
        sleeves=masks["sleeve"] | masks["armhole"],
        hem=masks["hem"],
        remove=body & ~hidden,
        hidden=hidden,
        inpaint=inpaint,
        openings=tuple(openings),
        garment_type=kind,
        seam_px=seam,
    )
