"""Inner garment reconstruction (IGR): where the hidden inside of the garment must appear.

Once the body is taken out of a photo, every place where it left the garment becomes an
*opening* through which a ghost-mannequin image shows the garment's inside: the back of the
collar through the neck opening, the inside of each sleeve at the cuff, the inside back of the
hem (or of each trouser leg). This module finds those openings from the garment and body masks
alone and draws the region to reconstruct at each:

* an opening is a stretch where a body component touches the garment; its outward direction
  runs from the garment's pixels to the body's pixels around it;
* classification uses that direction and the garment's geometry: an upward opening near the
  top is the neck (the waist for trousers); a downward opening in the middle of a top or dress
  is the hem; openings off to the sides are sleeves; each trouser leg has its own hem;
* sleeve and hem regions are half-ellipses beyond the garment's edge line, as wide as the
  garment is across the opening, as deep as a tube seen from slightly above
  (:data:`TUBE_DEPTH_RATIO`; a torso hem is flatter, :data:`HEM_DEPTH_RATIO`);
* the neck region is the body enclosed by the neckline plus the back of the collar: a
  half-ellipse spanning the collar tips, rising :data:`NECK_BACK_RATIO` of the half-width above
  them (:data:`WAIST_BACK_RATIO` for a waistband).

Body outside all regions is removed (it becomes backdrop). The inpaint mask is the regions
dilated a few pixels into the garment, so generated content blends across the seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from workers.pipelines.ghost.segmentation import Mask, dilate, remove_small

GarmentType = Literal["top", "dress", "trousers"]
OpeningKind = Literal["neck", "sleeve", "hem"]
Vec = tuple[float, float]

# Depth of each hidden half-ellipse as a fraction of its half-width.
NECK_BACK_RATIO = 0.35
WAIST_BACK_RATIO = 0.13
TUBE_DEPTH_RATIO = 0.3
HEM_DEPTH_RATIO = 0.12


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


def infer_garment_type(garment: Mask) -> GarmentType:
    """Classify a garment silhouette as trousers, dress or top from its geometry.

    Trousers: most rows of the lower third split into two legs around a narrow central gap.
    Dress: at least twice as tall as the narrowest row between 15% and 35% of its height (the
    bodice, below the neckline). Otherwise a top.
    """
    ys, xs = np.nonzero(garment)
    if len(ys) == 0:
        return "top"
    top, bottom = int(ys.min()), int(ys.max())
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
    # Narrowest row extent in the upper body, below the neckline and mostly past the sleeves.
    band = garment[top + round(0.15 * height) : top + round(0.35 * height) + 1]
    extents = [int(np.ptp(np.flatnonzero(row))) + 1 for row in band if row.any()]
    upper = min(extents) if extents else width
    return "dress" if height >= 2.0 * upper else "top"


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


def _contacts(garment: Mask, body: Mask, reach: int) -> list[_Contact]:
    touch = body & dilate(garment, reach)
    touch = remove_small(touch, 4)
    n, labels, _, _ = cv2.connectedComponentsWithStats(touch.astype(np.uint8), connectivity=8)
    lab = np.asarray(labels)
    out = []
    h, w = garment.shape
    for i in range(1, n):
        ys, xs = np.nonzero(lab == i)
        pts = np.stack([xs, ys], axis=1).astype(np.float64)
        centre = pts.mean(0)
        extent = float(np.ptp(pts, axis=0).max())
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
        out.append(_Contact(pts, centre, outward, along))
    return out


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
    region = half_ellipse(garment.shape, centre, along, outward, a, ratio * a) & ~garment
    return Opening(kind, centre, along, outward, a, region)


def _neck_opening(
    contact: _Contact, garment: Mask, body: Mask, garment_type: GarmentType
) -> Opening:
    """The top opening: enclosed body below the collar tips plus the back of the collar."""
    if garment_type == "trousers":
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
    return Opening("neck", centre, along, outward, a, (back | enclosed) & ~garment)


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
    kind = garment_type or infer_garment_type(garment)
    empty = np.zeros((h, w), bool)
    ys, xs = np.nonzero(garment)
    if len(ys) == 0:
        return IgrRegions(empty, empty, empty, body.copy(), empty, empty, (), kind, seam)
    top, bottom = int(ys.min()), int(ys.max())
    left, right = int(xs.min()), int(xs.max())
    cx = (left + right) / 2
    height, width = bottom - top + 1, right - left + 1

    necks: list[_Contact] = []
    hems: list[_Contact] = []
    sleeves: list[_Contact] = []
    for c in _contacts(garment, body, reach):
        oy = c.outward[1]
        if oy < -0.5 and c.centre[1] < top + 0.45 * height:
            necks.append(c)
        elif kind == "trousers":
            (hems if oy > 0.3 else sleeves).append(c)
        elif oy > 0.3 and abs(c.centre[0] - cx) < 0.22 * width and c.centre[1] > top + 0.5 * height:
            hems.append(c)
        else:
            sleeves.append(c)

    openings: list[Opening] = []
    if necks:
        # One neck: the biggest upward contact. Others (a shoulder showing above a strap) are
        # body to remove, not openings.
        neck = max(necks, key=lambda c: len(c.points) / (1.0 + abs(c.centre[0] - cx) / width))
        openings.append(_neck_opening(neck, garment, body, kind))
    for c in sleeves:
        openings.append(_edge_opening("sleeve", c, garment, TUBE_DEPTH_RATIO))
    if kind == "trousers":
        openings.extend(_edge_opening("hem", c, garment, TUBE_DEPTH_RATIO) for c in hems)
    elif hems:
        openings.append(_edge_opening("hem", _merge(hems), garment, HEM_DEPTH_RATIO))

    masks: dict[OpeningKind, Mask] = {
        "neck": empty.copy(),
        "sleeve": empty.copy(),
        "hem": empty.copy(),
    }
    for o in openings:
        masks[o.kind] |= o.region
    hidden = masks["neck"] | masks["sleeve"] | masks["hem"]
    inpaint = hidden | (dilate(hidden, seam) & garment)
    return IgrRegions(
        neck=masks["neck"],
        sleeves=masks["sleeve"],
        hem=masks["hem"],
        remove=body & ~hidden,
        hidden=hidden,
        inpaint=inpaint,
        openings=tuple(openings),
        garment_type=kind,
        seam_px=seam,
    )
