"""Quality report for a ghost-mannequin result, and when it needs a human look.

Measures, all on the output at working resolution:

* **residual body** — the fraction of opaque pixels (alpha >= 0.5) whose colour matches the
  mannequin or skin: within :data:`BODY_MATCH_DELTA_E` of a body colour centre of the
  segmentation's colour model and at most half as far from it as from any garment colour.
  Specks are ignored (a morphological opening of radius :data:`SPECK_RADIUS` of the image
  diagonal, 2 px at 360x480), so noise, anti-aliasing and a print's mixed edges do not count;
  a left-over patch of mannequin does. Body colours
  closer than :data:`DISTINCT_BODY_DELTA_E` to a garment colour are not looked for: colour
  alone cannot separate them.
* **seam continuity** — across the border of the inpaint mask, where generated content meets
  the kept garment: the colour step (ΔE between the local means 1-3 px on either side) at
  each border pixel, summarised by its median and 90th percentile, and compared with the same
  step measured across an equally long line inside the untouched garment (the garment's own
  texture). Also the ratio of gradient strength on the border to that in the garment.
* **alpha coverage** — the opaque fraction of the frame, the fraction of soft edge pixels, and
  whether the garment touches the frame.

``needs_review`` is set, with a reason each, when (thresholds below):

* residual body exceeds :data:`MAX_RESIDUAL_BODY` (0.3% of the opaque pixels);
* the seam's median step exceeds both :data:`MAX_SEAM_DELTA_E` (ΔE 20) and
  :data:`SEAM_TEXTURE_FACTOR` (3) times the garment's own median step (a print's edges make
  the garment's own steps large; the median of a seam that blends stays low, one that does
  not is large all along);
* coverage is below :data:`MIN_COVERAGE` (2%: no garment found) or above
  :data:`MAX_COVERAGE` (90%: the backdrop was not removed);
* the garment touches the frame (it was cut off in the photo).

With a :class:`QualityContext` (what the pipeline saw and did), checks that do not trust the
segmentation they check:

* **skin** — a person's skin found afresh in the photo (:func:`detect_skin`, seeded at the
  silhouette's extremities and told from the garment by the colours of the *output's* core)
  and left opaque in the output, above :data:`MAX_SKIN` of it;
* **openings** — more openings of a kind than the garment type has (two sleeves, one neck,
  one hem; two legs for trousers), or body removed without any opening found;
* **threads** — thin pieces hanging below the garment (:func:`hanging_threads`);
* **fragments** — the opaque output in pieces: the main piece under
  :data:`MIN_MAIN_PIECE` of it;
* **backdrop left** — opaque output reaching its outline and coloured like the fitted
  backdrop where it stood (a floor or a cove cut out with the garment), above
  :data:`MAX_BACKDROP_LEFT` of it;
* **backdrop fit** — the fitted backdrop explains less than :data:`MIN_BACKDROP_EXPLAINED`
  of the border band (the cut-out rests on a poor backdrop model);
* **interior frame** — an interior shot was sent but could not be aligned and used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from workers.pipelines.ghost.segmentation import (
    BackdropFit,
    ColourModel,
    FloatImage,
    Mask,
    detect_skin,
    dilate,
    disk,
    erode,
    hanging_pieces,
    kmeans,
    normalized_blur,
    rgb_to_lab,
)

BODY_MATCH_DELTA_E = 10.0
DISTINCT_BODY_DELTA_E = 15.0
SPECK_RADIUS = 0.004
MAX_RESIDUAL_BODY = 0.003
MAX_SEAM_DELTA_E = 20.0
SEAM_TEXTURE_FACTOR = 3.0
MIN_COVERAGE = 0.02
MAX_COVERAGE = 0.90
MAX_SKIN = 0.005
MIN_MAIN_PIECE = 0.97
MIN_BACKDROP_EXPLAINED = 0.6
MAX_BACKDROP_LEFT = 0.005
# How many openings of each kind a garment type can show.
MAX_OPENINGS: dict[str, dict[str, int]] = {
    "top": {"neck": 1, "sleeve": 2, "armhole": 2, "hem": 1},
    "hoodie": {"neck": 1, "sleeve": 2, "armhole": 0, "hem": 1},
    "sleeveless": {"neck": 1, "sleeve": 0, "armhole": 2, "hem": 1},
    "dress": {"neck": 1, "sleeve": 2, "armhole": 2, "hem": 1},
    "skirt": {"neck": 1, "sleeve": 0, "armhole": 0, "hem": 1},
    "trousers": {"neck": 1, "sleeve": 0, "armhole": 0, "hem": 2},
}


@dataclass(frozen=True)
class QualityContext:
    """What the pipeline saw and did, for the checks that do not trust its masks."""

    source: np.ndarray  # the working photo (RGB), before anything was removed
    foreground: Mask  # not backdrop, by the backdrop fit alone
    fit: BackdropFit | None = None
    backdrop_explained: float = 1.0
    garment_type: str = "top"
    openings: tuple[str, ...] = ()  # kinds of the openings found
    removed_body_pixels: int = 0
    interior_sent: bool = False
    interior_used: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QualityReport:
    """Measured quality of one result; see the module docstring for definitions."""

    residual_body_fraction: float
    residual_body_pixels: int
    seam_delta_e_median: float
    seam_delta_e_p90: float
    garment_delta_e_median: float
    garment_delta_e_p90: float
    seam_gradient_ratio: float
    seam_pixels: int
    alpha_coverage: float
    alpha_soft_fraction: float
    touches_frame: bool
    needs_review: bool
    reasons: tuple[str, ...]
    skin_fraction: float = 0.0
    main_piece_fraction: float = 1.0
    backdrop_explained: float = 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


def residual_body(lab: FloatImage, opaque: Mask, colours: ColourModel) -> Mask:
    """Opaque pixels coloured like the body (see module docstring), specks removed."""
    body = colours.body
    if len(colours.garment) and len(body):
        # A body colour the garment also has (a grey stand under a grey print) cannot be told
        # apart by colour; only distinct ones are looked for.
        sep = np.min(np.linalg.norm(body[:, None, :] - colours.garment[None], axis=2), axis=1)
        body = body[sep >= DISTINCT_BODY_DELTA_E]
    if len(body) == 0 or not opaque.any():
        return np.zeros_like(opaque)
    px = lab[opaque]
    d_body = np.min(((px[:, None, :] - body[None]) ** 2).sum(2), axis=1)
    if len(colours.garment):
        d_garment = np.min(((px[:, None, :] - colours.garment[None]) ** 2).sum(2), axis=1)
    else:
        d_garment = np.full(len(px), np.inf, np.float32)
    # Clearly closer to the body than to any garment colour: twice as close, in ΔE.
    hit = (4.0 * d_body <= d_garment) & (d_body <= BODY_MATCH_DELTA_E**2)
    out = np.zeros_like(opaque)
    out[opaque] = hit
    h, w = opaque.shape
    radius = max(1, round(SPECK_RADIUS * float(np.hypot(h, w))))
    return np.asarray(cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_OPEN, disk(radius))) > 0


def find_skin(context: QualityContext, opaque: Mask) -> Mask:
    """A person's skin in the photo, found afresh: seeded at the silhouette's extremities and
    told from the garment by the colours of the output's core, not by the segmentation."""
    lab = rgb_to_lab(np.asarray(context.source, np.float32))
    core = erode(opaque, max(2, round(0.03 * float(np.hypot(*opaque.shape)))))
    if not core.any():
        core = opaque
    samples = lab[core]
    if len(samples) > 4000:
        samples = samples[np.random.default_rng(0).choice(len(samples), 4000, replace=False)]
    centres, weights, _ = kmeans(samples.astype(np.float32), 4)
    return detect_skin(
        np.asarray(context.source, np.uint8), lab, context.foreground, centres[weights >= 0.05]
    )


def skin_left(skin: Mask, opaque: Mask, generated: Mask | None) -> Mask:
    """The skin the output keeps opaque, specks ignored."""
    left = skin & opaque
    if generated is not None:
        left &= ~generated
    h, w = opaque.shape
    radius = max(1, round(SPECK_RADIUS * float(np.hypot(h, w))))
    return np.asarray(cv2.morphologyEx(left.astype(np.uint8), cv2.MORPH_OPEN, disk(radius))) > 0


def backdrop_left(context: QualityContext, opaque: Mask, generated: Mask | None) -> Mask:
    """Opaque output coloured like the fitted backdrop where it stood, reaching the outline:
    backdrop (a floor, a cove, a shadow) cut out with the garment. A print of the backdrop's
    colour inside the garment does not reach the outline."""
    if context.fit is None:
        return np.zeros_like(opaque)
    lab = rgb_to_lab(np.asarray(context.source, np.float32))
    like = (context.fit.distance(lab) <= 1.0) & opaque
    if generated is not None:
        like &= ~generated
    h, w = opaque.shape
    radius = max(1, round(SPECK_RADIUS * float(np.hypot(h, w))))
    like = np.asarray(cv2.morphologyEx(like.astype(np.uint8), cv2.MORPH_OPEN, disk(radius))) > 0
    _, labels, _, _ = cv2.connectedComponentsWithStats(like.astype(np.uint8), connectivity=8)
    lab_img = np.asarray(labels)
    outline = dilate(~opaque, radius + 1) & like
    hit = np.unique(lab_img[outline])
    return np.asarray(np.isin(lab_img, hit[hit > 0]))


def hanging_threads(opaque: Mask) -> int:
    """How many thin pieces hang below the garment (see :func:`hanging_pieces`)."""
    n, _ = cv2.connectedComponents(hanging_pieces(opaque).astype(np.uint8), connectivity=8)
    return int(n) - 1


def main_piece_fraction(opaque: Mask) -> float:
    """Share of the opaque output in its largest 8-connected piece."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(opaque.astype(np.uint8), connectivity=8)
    if n <= 1:
        return 1.0
    areas = np.asarray(stats)[1:, cv2.CC_STAT_AREA]
    return float(areas.max()) / float(areas.sum())


def _opening_reasons(context: QualityContext) -> list[str]:
    reasons = []
    limits = MAX_OPENINGS.get(context.garment_type, MAX_OPENINGS["top"])
    for kind, limit in limits.items():
        count = context.openings.count(kind)
        if count > limit:
            reasons.append(
                f"{count} {kind} openings for a {context.garment_type} (at most {limit})"
            )
    if not context.openings and context.removed_body_pixels > 0:
        reasons.append("body was removed but no opening was found")
    return reasons


def _gradient(lab: FloatImage) -> FloatImage:
    gx = np.asarray(cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3), np.float32) / 8.0
    gy = np.asarray(cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3), np.float32) / 8.0
    return np.asarray(np.sqrt((gx**2 + gy**2).sum(2)), np.float32)


def _step_across(lab: FloatImage, region: Mask, support: Mask) -> tuple[np.ndarray, Mask]:
    """ΔE between local means just inside ``region`` and just outside it (within ``support``)."""
    inside_dist = np.asarray(cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3))
    outside_dist = np.asarray(cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 3))
    ring_in = region & (inside_dist >= 1.0) & (inside_dist <= 3.5)
    ring_out = ~region & support & (outside_dist >= 1.0) & (outside_dist <= 3.5)
    border = region & dilate(~region, 1) & dilate(ring_out, 2) & dilate(ring_in, 2)
    if not border.any():
        return np.zeros(0, np.float32), border
    mean_in = normalized_blur(lab, ring_in, 2.0)
    mean_out = normalized_blur(lab, ring_out, 2.0)
    step = np.linalg.norm(mean_in[border] - mean_out[border], axis=1)
    return step.astype(np.float32), border


def quality_report(
    rgb: np.ndarray,
    alpha: FloatImage,
    colours: ColourModel,
    *,
    generated: Mask | None = None,
    garment: Mask | None = None,
    context: QualityContext | None = None,
) -> QualityReport:
    """Measure a result: ``rgb`` is the foreground colour, ``alpha`` its opacity.

    ``generated`` is the inpaint mask (where content was generated) and ``garment`` the kept
    garment pixels; without them the seam is not measured.
    """
    lab = rgb_to_lab(np.asarray(rgb, np.float32))
    h, w = alpha.shape
    opaque = alpha >= 0.5
    n_opaque = int(opaque.sum())
    residual = residual_body(lab, opaque, colours)
    n_residual = int(residual.sum())
    residual_fraction = n_residual / n_opaque if n_opaque else 0.0

    seam_median = seam_p90 = texture_median = texture_p90 = 0.0
    grad_ratio = 1.0
    n_seam = 0
    if generated is not None and garment is not None and generated.any():
        kept = garment & ~generated
        steps, border = _step_across(lab, generated, kept)
        n_seam = len(steps)
        if n_seam:
            seam_median = float(np.median(steps))
            seam_p90 = float(np.quantile(steps, 0.9))
            # The same measurement across a line inside untouched garment: its own texture.
            probe = np.zeros_like(kept)
            probe[:, : w // 2] = True
            ref_steps, _ = _step_across(lab, probe & kept, kept)
            if len(ref_steps):
                texture_median = float(np.median(ref_steps))
                texture_p90 = float(np.quantile(ref_steps, 0.9))
            grad = _gradient(lab)
            base = float(np.median(grad[kept])) if kept.any() else 1.0
            grad_ratio = float(np.mean(grad[border])) / max(base, 1e-3)

    coverage = n_opaque / (h * w)
    soft = float(((alpha > 0.02) & (alpha < 0.98)).sum()) / max(n_opaque, 1)
    edge = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    touches = bool((edge >= 0.5).any())

    reasons: list[str] = []
    if residual_fraction > MAX_RESIDUAL_BODY:
        reasons.append(f"residual body pixels {residual_fraction:.2%} > {MAX_RESIDUAL_BODY:.2%}")
    if seam_median > max(MAX_SEAM_DELTA_E, SEAM_TEXTURE_FACTOR * texture_median):
        reasons.append(
            f"visible seam: median ΔE {seam_median:.1f} (garment's own {texture_median:.1f})"
        )
    if coverage < MIN_COVERAGE:
        reasons.append(f"garment covers only {coverage:.1%} of the frame")
    if coverage > MAX_COVERAGE:
        reasons.append(f"foreground covers {coverage:.1%} of the frame: backdrop not removed")
    if touches:
        reasons.append("garment touches the frame")
    skin_fraction = 0.0
    pieces = main_piece_fraction(opaque)
    explained = 1.0
    if context is not None:
        skin = find_skin(context, opaque)
        kept = skin_left(skin, opaque, generated)
        skin_fraction = int(kept.sum()) / n_opaque if n_opaque else 0.0
        if skin_fraction > MAX_SKIN:
            reasons.append(f"skin left in the output: {skin_fraction:.2%} of it")
        reasons.extend(_opening_reasons(context))
        left = backdrop_left(context, alpha >= 0.98, generated)
        left_fraction = int(left.sum()) / n_opaque if n_opaque else 0.0
        if left_fraction > MAX_BACKDROP_LEFT:
            reasons.append(f"backdrop left in the output: {left_fraction:.2%} of it")
        explained = context.backdrop_explained
        if explained < MIN_BACKDROP_EXPLAINED:
            reasons.append(f"backdrop fit explains only {explained:.0%} of the border")
        if context.interior_sent and not context.interior_used:
            reasons.append("the interior shot was sent but could not be used")
        reasons.extend(context.notes)
    threads = hanging_threads(opaque)
    if threads:
        reasons.append(f"{threads} thin piece(s) hang below the garment")
    if pieces < MIN_MAIN_PIECE and n_opaque:
        reasons.append(f"garment in pieces: the main one is {pieces:.0%} of it")
    return QualityReport(
        residual_body_fraction=round(residual_fraction, 6),
        residual_body_pixels=n_residual,
        seam_delta_e_median=round(seam_median, 3),
        seam_delta_e_p90=round(seam_p90, 3),
        garment_delta_e_median=round(texture_median, 3),
        garment_delta_e_p90=round(texture_p90, 3),
        seam_gradient_ratio=round(grad_ratio, 3),
        seam_pixels=n_seam,
        alpha_coverage=round(coverage, 6),
        alpha_soft_fraction=round(soft, 6),
        touches_frame=touches,
        needs_review=bool(reasons),
        reasons=tuple(reasons),
        skin_fraction=round(skin_fraction, 6),
        main_piece_fraction=round(pieces, 6),
        backdrop_explained=round(explained, 4),
    )
