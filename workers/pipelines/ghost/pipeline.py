"""The ``ghost_mannequin`` operation: photo of a dressed mannequin or model → ghost image.

Reads top to bottom: resize to the working resolution → segment → find the hidden regions
(IGR) → place the studio's interior shot if one was sent (neck joint) → build one inpainting
request for what is still missing, cropped to the garment → inpaint → paste back → composite
→ quality report.

The work is split at the inpainter: :func:`prepare_ghost` returns a :class:`GhostJob` holding
the :class:`InpaintRequest` (``None`` when nothing needs generating) and :func:`finish_ghost`
turns the inpainter's result into the :class:`GhostResult`, so a worker can batch the requests
of several jobs through ``Inpainter.inpaint_batch``. :func:`ghost_mannequin` runs all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from workers.pipelines.contracts import (
    Inpainter,
    InpaintRequest,
    InpaintResult,
    ProgressCallback,
)
from workers.pipelines.ghost.composite import Background, ShadowStyle, composite
from workers.pipelines.ghost.igr import GarmentType, IgrRegions, reconstruct_regions
from workers.pipelines.ghost.neckjoint import NeckJoint, apply_neck_joint
from workers.pipelines.ghost.quality import QualityContext, quality_report
from workers.pipelines.ghost.segmentation import (
    ColourModel,
    FloatImage,
    Mask,
    RGBArray,
    Segmentation,
    Segmenter,
    as_rgb_array,
    dilate,
    normalized_blur,
    rgb_to_lab,
    segment,
    studio_refusal,
)

# The hidden inside of a garment is in its own shadow: the prefill is the local garment
# colour darkened by this factor.
INTERIOR_SHADE = 0.8
# Crop margin around the garment, as a fraction of the working long side (and at least 16 px).
CROP_MARGIN = 0.05
# A phase-correlation-only alignment below this response is not trusted.
MIN_PHASE_RESPONSE = 0.1

NEGATIVE_PROMPT = (
    "person, mannequin, dress form, body, skin, neck, arms, hands, legs, face, hair, stand, "
    "text, watermark, logo, blurry, distorted, deformed, extra fabric, background clutter"
)

_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 22),
    "charcoal": (55, 56, 60),
    "grey": (128, 128, 128),
    "light grey": (195, 195, 195),
    "white": (245, 245, 245),
    "cream": (240, 230, 200),
    "beige": (215, 195, 160),
    "khaki": (170, 150, 105),
    "tan": (190, 150, 100),
    "brown": (110, 70, 40),
    "navy": (30, 42, 92),
    "blue": (40, 80, 190),
    "light blue": (150, 190, 230),
    "teal": (30, 120, 130),
    "turquoise": (60, 200, 200),
    "green": (50, 140, 60),
    "dark green": (40, 85, 55),
    "olive": (110, 110, 50),
    "yellow": (235, 210, 50),
    "mustard": (200, 160, 40),
    "orange": (230, 120, 40),
    "red": (185, 30, 40),
    "burgundy": (110, 25, 48),
    "pink": (235, 150, 180),
    "magenta": (200, 40, 140),
    "purple": (100, 50, 130),
    "lavender": (180, 160, 220),
}
_PALETTE_LAB = rgb_to_lab(np.asarray(list(_PALETTE.values()), np.float32))
_PALETTE_NAMES = list(_PALETTE)

_NOUNS: dict[GarmentType, str] = {
    "top": "top",
    "sleeveless": "sleeveless top",
    "hoodie": "hoodie",
    "dress": "dress",
    "skirt": "skirt",
    "trousers": "trousers",
}
_HIDDEN_PARTS: dict[GarmentType, str] = {
    "top": "the inner back of the collar seen through the neck opening, the inside of the "
    "sleeves and of the hem",
    "sleeveless": "the inner back of the neckline seen through the neck opening, the inside "
    "of the armholes and of the hem",
    "hoodie": "the inside of the hood and the inner back of the neck, the inside of the "
    "sleeves and of the hem",
    "dress": "the inner back of the neckline seen through the neck opening, the inside of the "
    "sleeves and of the skirt's hem",
    "skirt": "the inner back of the waistband, the inside of the hem",
    "trousers": "the inner back of the waistband, the inside of the leg openings",
}


@dataclass(frozen=True)
class GhostParams:
    """Parameters of one ``ghost_mannequin`` job."""

    background: Background = "white"
    size: int = 1024  # long side of the output, rounded to a multiple of 8
    steps: int = 30
    strength: float = 0.99
    guidance: float = 7.0
    seed: int = 0
    shadow: bool = False
    garment_type: GarmentType | None = None  # inferred from the silhouette when None
    debug_layers: bool = False

    def __post_init__(self) -> None:
        if self.background not in ("white", "transparent"):
            raise ValueError(
                f"background must be 'white' or 'transparent', not {self.background!r}"
            )
        if not 64 <= self.size <= 4096:
            raise ValueError("size must be between 64 and 4096")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")


# Below this share of the frame there is no garment to work on, only noise or a backdrop.
MIN_GARMENT_FRACTION = 0.005


class NotAGhostPhoto(ValueError):
    """The photo is not something a ghost-mannequin image can be made from.

    ``code`` is the job's stable error code; nothing is charged for a refused photo.
    """

    code = "not-a-ghost-photo"


class NoGarmentFound(NotAGhostPhoto):
    """Segmentation found nothing that could be the garment."""

    code = "no-garment-found"


class BusyScene(NotAGhostPhoto):
    """No plain studio backdrop: a room, a shop or a street, not a product shot."""

    code = "no-backdrop-found"


@dataclass
class GhostResult:
    """The finished image (RGB on white, RGBA when transparent), its alpha and diagnostics.

    ``report`` holds the quality measures and ``needs_review`` (see ``quality``), the garment
    type and colour names, the openings found (centres in input-image pixels), the neck-joint
    outcome, the working size and inpainting crop, the prompt and the GPU seconds.
    """

    image: Image.Image
    alpha: Image.Image  # L, at the output size
    layers: dict[str, Image.Image]  # debug masks (L) and the pre-inpaint image, if requested
    report: dict[str, object]
    gpu_seconds: float


@dataclass
class GhostJob:
    """Everything between preparation and finishing; ``request`` is what to inpaint."""

    params: GhostParams
    source: RGBArray  # the photo at working size, as it was sent
    interior_sent: bool
    interior_used: bool
    work: RGBArray  # working image with the body removed and the prefill in place
    segmentation: Segmentation
    regions: IgrRegions
    hidden: Mask  # all hidden regions (neck-joint coverage included)
    generate: Mask  # full-frame inpaint mask
    covered: Mask  # hidden region filled from the interior shot
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 of the request inside ``work``
    request: InpaintRequest | None
    prompt: str
    info: dict[str, object] = field(default_factory=dict)


def working_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) with the long side ``long_side`` (rounded to 8) and both sides multiples of 8."""
    target = max(8, round(long_side / 8) * 8)
    scale = target / max(width, height)
    w = max(8, round(width * scale / 8) * 8)
    h = max(8, round(height * scale / 8) * 8)
    return (target, h) if width >= height else (w, target)


def _resize_rgb(rgb: RGBArray, size: tuple[int, int]) -> RGBArray:
    h, w = rgb.shape[:2]
    if (w, h) == size:
        return rgb.copy()
    interp = cv2.INTER_AREA if size[0] < w else cv2.INTER_CUBIC
    return np.asarray(cv2.resize(rgb, size, interpolation=interp), np.uint8)


def _resize_mask(mask: NDArray[np.bool_] | None, size: tuple[int, int]) -> Mask | None:
    if mask is None:
        return None
    m = np.asarray(mask, bool).astype(np.float32)
    if m.shape[::-1] != size:
        m = np.asarray(cv2.resize(m, size, interpolation=cv2.INTER_AREA), np.float32)
    return m >= 0.5


def colour_names(colours: ColourModel, *, limit: int = 2, min_weight: float = 0.2) -> list[str]:
    """Names of the garment's dominant colours, heaviest first (palette nearest in Lab)."""
    names: list[str] = []
    for centre, weight in zip(colours.garment, colours.garment_weights, strict=True):
        if weight < min_weight and names:
            continue
        d = np.linalg.norm(_PALETTE_LAB - centre, axis=1)
        name = _PALETTE_NAMES[int(np.argmin(d))]
        if name not in names:
            names.append(name)
        if len(names) == limit:
            break
    return names


def build_prompt(colours: ColourModel, garment_type: GarmentType) -> str:
    """The inpainting prompt: the garment's colours and type, and what the hidden parts are."""
    names = colour_names(colours)
    colour = " and ".join(names) if names else "plain"
    return (
        f"the inside of a {colour} {_NOUNS[garment_type]}: {_HIDDEN_PARTS[garment_type]}, "
        f"same {colour} fabric, colour and texture as the garment, in soft shadow, "
        "invisible mannequin product photo, studio lighting, seamless, photorealistic"
    )


def _crop_box(region: Mask, margin: int) -> tuple[int, int, int, int]:
    """A box around ``region`` with ``margin``, sides multiples of 8, inside the frame."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return 0, 0, w, h
    boxes = []
    for lo, hi, limit in ((xs.min(), xs.max() + 1, w), (ys.min(), ys.max() + 1, h)):
        lo, hi = max(0, int(lo) - margin), min(limit, int(hi) + margin)
        size = min(limit, max(64, -(-(hi - lo) // 8) * 8))
        start = min(max(0, (lo + hi - size) // 2), limit - size)
        boxes.append((start, start + size))
    (x0, x1), (y0, y1) = boxes
    return x0, y0, x1, y1


def _prefill(work: RGBArray, garment: Mask, hidden: Mask, diag: float) -> RGBArray:
    """Paint hidden regions with the surrounding garment colour in shadow (the model's start)."""
    if not hidden.any() or not garment.any():
        return work
    local = normalized_blur(work.astype(np.float32), garment, max(4.0, 0.03 * diag))
    out = work.copy()
    out[hidden] = np.clip(local[hidden] * INTERIOR_SHADE, 0, 255).astype(np.uint8)
    return out


def prepare_ghost(
    image: Image.Image | RGBArray,
    *,
    params: GhostParams,
    garment_mask: NDArray[np.bool_] | None = None,
    body_mask: NDArray[np.bool_] | None = None,
    interior: Image.Image | RGBArray | None = None,
    segmenter: Segmenter | None = None,
) -> GhostJob:
    """Everything before the inpainter: analysis, neck joint, and the inpainting request.

    Caller masks are at the input's resolution. The interior shot is scaled like the main
    photo (the same camera is assumed) before alignment.
    """
    src = as_rgb_array(image)
    sh, sw = src.shape[:2]
    size = working_size(sw, sh, params.size)
    scale = size[0] / sw
    work = _resize_rgb(src, size)
    seg = segment(
        work,
        garment_mask=_resize_mask(garment_mask, size),
        body_mask=_resize_mask(body_mask, size),
        segmenter=segmenter,
    )
    # The classical analysis needs a studio backdrop; caller masks or a learned segmenter
    # do not.
    if seg.source == "classical" and seg.fit is not None:
        refusal = studio_refusal(seg.fit, seg.foreground, rgb_to_lab(work))
        if refusal is not None:
            raise BusyScene(
                f"This is not a ghost-mannequin studio photo: {refusal}. Send a photo of a "
                "garment on a mannequin or model against a plain backdrop, or a garment mask."
            )
    if seg.garment.mean() < MIN_GARMENT_FRACTION:
        raise NoGarmentFound(
            f"No garment was found: it covers {seg.garment.mean():.2%} of the photo. Send a "
            "photo of a garment on a mannequin or model, or a garment mask."
        )
    regions = reconstruct_regions(seg.garment, seg.body, garment_type=params.garment_type)
    info: dict[str, object] = {
        "working_size": list(size),
        "body_found": bool(seg.body.any()),
        "segmentation": seg.source,
        "body_kind": seg.colours.body_kind,
        "garment_type": regions.garment_type,
        "garment_colours": colour_names(seg.colours),
        "openings": [
            {
                "kind": o.kind,
                "centre": [round(o.centre[0] / scale, 1), round(o.centre[1] / scale, 1)],
                "half_width": round(o.half_width / scale, 1),
            }
            for o in regions.openings
        ],
    }

    # Body outside the hidden regions becomes backdrop, so the model never sees a mannequin;
    # its anti-aliased outline goes too, or a faint silhouette would stay in the request.
    base = work.copy()
    gone = dilate(regions.remove, 2) & ~seg.garment & ~regions.hidden
    base[gone] = np.clip(seg.backdrop_rgb[gone], 0, 255).astype(np.uint8)

    if not seg.body.any():
        info["note"] = (
            "no mannequin or model was found: the garment is cut out as it is and nothing "
            "is reconstructed"
        )
    covered = np.zeros_like(regions.hidden)
    interior_used = False
    if interior is not None and regions.neck.any():
        inner = as_rgb_array(interior)
        ih, iw = inner.shape[:2]
        inner = _resize_rgb(inner, (max(8, round(iw * scale)), max(8, round(ih * scale))))
        joint: NeckJoint = apply_neck_joint(base, inner, regions.neck, garment=seg.garment)
        trusted = joint.alignment.method != "phase" or joint.alignment.score >= MIN_PHASE_RESPONSE
        info["neck_joint"] = {
            "method": joint.alignment.method,
            "score": round(joint.alignment.score, 4),
            "inliers": joint.alignment.inliers,
            "used": trusted,
            "covered_fraction": round(
                float(joint.covered.sum()) / max(int(regions.neck.sum()), 1), 4
            )
            if trusted
            else 0.0,
        }
        if trusted:
            base = joint.image
            covered = joint.covered
            interior_used = bool(covered.any())

    remaining = regions.hidden & ~covered
    generate = remaining | (dilate(remaining, regions.seam_px) & seg.garment & ~covered)
    diag = float(np.hypot(*size))
    base = _prefill(base, seg.garment, remaining, diag)
    prompt = build_prompt(seg.colours, regions.garment_type)

    margin = max(16, round(CROP_MARGIN * max(size)))
    crop = _crop_box(seg.garment | regions.hidden, margin)
    request = None
    if generate.any():
        x0, y0, x1, y1 = crop
        mask = (generate[y0:y1, x0:x1] * 255).astype(np.uint8)
        request = InpaintRequest(
            image=Image.fromarray(base[y0:y1, x0:x1], "RGB"),
            mask=Image.fromarray(mask, "L"),
            prompt=prompt,
            negative_prompt=NEGATIVE_PROMPT,
            seed=params.seed,
            steps=params.steps,
            strength=params.strength,
            guidance=params.guidance,
        )
    info["crop"] = list(crop)
    info["generated_fraction"] = round(float(generate.sum()) / (size[0] * size[1]), 6)
    return GhostJob(
        params=params,
        source=work,
        interior_sent=interior is not None,
        interior_used=interior_used,
        work=base,
        segmentation=seg,
        regions=regions,
        hidden=regions.hidden,
        generate=generate,
        covered=covered,
        crop=crop,
        request=request,
        prompt=prompt,
        info=info,
    )


def _paste(job: GhostJob, result: InpaintResult) -> RGBArray:
    x0, y0, x1, y1 = job.crop
    gen = np.asarray(result.image.convert("RGB"), np.uint8)
    if gen.shape[:2] != (y1 - y0, x1 - x0):
        raise ValueError(
            f"inpainter returned {gen.shape[1]}x{gen.shape[0]}, asked {x1 - x0}x{y1 - y0}"
        )
    mask = job.generate[y0:y1, x0:x1].astype(np.float32)
    # A one-pixel feather outside the mask; inside it the generated pixels are taken whole.
    weight = np.maximum(np.asarray(cv2.GaussianBlur(mask, (0, 0), 0.8), np.float32), mask)
    out = job.work.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region * (1 - weight[..., None]) + gen.astype(np.float32) * weight[..., None]
    out[y0:y1, x0:x1] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def _mask_image(mask: Mask | FloatImage) -> Image.Image:
    if mask.dtype == np.bool_:
        return Image.fromarray(mask.astype(np.uint8) * 255, "L")
    grey = np.clip(np.round(mask.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")


def finish_ghost(job: GhostJob, result: InpaintResult | None) -> GhostResult:
    """Paste the generated content back, composite and measure."""
    if job.request is not None and result is None:
        raise ValueError("this job has an inpainting request; its result is required")
    rgb = _paste(job, result) if result is not None and job.request is not None else job.work
    seg, regions = job.segmentation, job.regions
    hidden_soft = np.asarray(
        cv2.GaussianBlur(job.hidden.astype(np.float32), (0, 0), 0.6), np.float32
    )
    alpha = np.maximum(seg.alpha, np.maximum(hidden_soft, job.hidden.astype(np.float32)))
    alpha[regions.remove & ~dilate(seg.garment | job.hidden, 1)] = 0.0
    shadow = ShadowStyle() if job.params.shadow else None
    image, final_alpha, fg = composite(rgb, alpha, background=job.params.background, shadow=shadow)
    context = QualityContext(
        source=job.source,
        foreground=seg.foreground if seg.foreground is not None else ~seg.backdrop,
        fit=seg.fit,
        backdrop_explained=seg.fit.explained if seg.fit is not None else 1.0,
        garment_type=regions.garment_type,
        openings=tuple(o.kind for o in regions.openings),
        removed_body_pixels=int(regions.remove.sum()),
        interior_sent=job.interior_sent,
        interior_used=job.interior_used,
    )
    report = quality_report(
        fg,
        final_alpha,
        seg.colours,
        generated=job.generate,
        garment=seg.garment,
        context=context,
    )
    gpu = float(result.gpu_seconds) if result is not None else 0.0
    full_report: dict[str, object] = {**report.as_dict(), **job.info, "prompt": job.prompt}
    full_report["gpu_seconds"] = round(gpu, 6)
    layers: dict[str, Image.Image] = {}
    if job.params.debug_layers:
        named: dict[str, Mask | FloatImage] = {
            "backdrop": seg.backdrop,
            "garment": seg.garment,
            "body": seg.body,
            "neck": regions.neck,
            "sleeves": regions.sleeves,
            "hem": regions.hem,
            "remove": regions.remove,
            "inpaint_mask": job.generate,
            "interior_covered": job.covered,
            "alpha": final_alpha,
        }
        layers = {name: _mask_image(m) for name, m in named.items()}
        layers["before_inpaint"] = Image.fromarray(job.work, "RGB")
    return GhostResult(image, _mask_image(final_alpha), layers, full_report, gpu)


def ghost_mannequin(
    image: Image.Image | RGBArray,
    *,
    inpainter: Inpainter,
    params: GhostParams,
    garment_mask: NDArray[np.bool_] | None = None,
    body_mask: NDArray[np.bool_] | None = None,
    interior: Image.Image | RGBArray | None = None,
    progress: ProgressCallback | None = None,
    segmenter: Segmenter | None = None,
) -> GhostResult:
    """Turn a photo of a garment on a mannequin or model into a ghost-mannequin image.

    ``progress`` is passed to the inpainter (one call per denoising step); a
    :class:`~workers.pipelines.contracts.JobCancelled` raised from it propagates and nothing is
    returned. When the interior shot covers every hidden region the inpainter is not called.
    """
    job = prepare_ghost(
        image,
        params=params,
        garment_mask=garment_mask,
        body_mask=body_mask,
        interior=interior,
        segmenter=segmenter,
    )
    result = inpainter.inpaint(job.request, progress) if job.request is not None else None
    return finish_ghost(job, result)


__all__ = [
    "BusyScene",
    "GhostJob",
    "GhostParams",
    "GhostResult",
    "NoGarmentFound",
    "NotAGhostPhoto",
    "build_prompt",
    "colour_names",
    "finish_ghost",
    "ghost_mannequin",
    "prepare_ghost",
    "working_size",
]
