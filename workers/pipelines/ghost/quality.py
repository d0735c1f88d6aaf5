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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from workers.pipelines.ghost.segmentation import (
    ColourModel,
    FloatImage,
    Mask,
    dilate,
    disk,
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
    )
