"""Quality report: planted residual mannequin, visible seams, coverage."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from tests.garments import (
    BURGUNDY,
    MANNEQUIN_BEIGE,
    MANNEQUIN_BLACK,
    RED,
    SKIN,
    DiffusionTestInpainter,
    FlatFillTestInpainter,
    Scene,
    make_hard_scene,
    make_scene,
    run_ghost,
)
from workers.pipelines.ghost.pipeline import (
    GhostJob,
    GhostParams,
    GhostResult,
    ghost_mannequin,
)
from workers.pipelines.ghost.quality import (
    MAX_RESIDUAL_BODY,
    QualityContext,
    QualityReport,
    quality_report,
)
from workers.pipelines.ghost.segmentation import ColourModel, erode, segment

PARAMS = GhostParams(size=480, steps=12)

CASES: dict[str, tuple[dict[str, object], tuple[int, int, int]]] = {
    "beige-mannequin": ({"garment": "top"}, MANNEQUIN_BEIGE),
    "black-mannequin": (
        {"garment": "top", "garment_rgb": RED, "mannequin_rgb": MANNEQUIN_BLACK},
        MANNEQUIN_BLACK,
    ),
    "model": ({"garment": "dress", "wearer": "model", "garment_rgb": BURGUNDY}, SKIN),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def clean(request: pytest.FixtureRequest) -> tuple[Scene, GhostResult, ColourModel, str]:
    kwargs, _ = CASES[request.param]
    scene = make_scene(**kwargs)  # type: ignore[arg-type]
    result = ghost_mannequin(scene.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    return scene, result, segment(scene.image).colours, request.param


def _arrays(result: GhostResult) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    rgb = np.asarray(result.image.convert("RGB")).copy()
    alpha = (np.asarray(result.alpha) / 255.0).astype(np.float32)
    return rgb, alpha


def test_clean_output_needs_no_review(clean: tuple[Scene, GhostResult, ColourModel, str]) -> None:
    _, result, _, _ = clean
    assert result.report["needs_review"] is False, result.report["reasons"]
    assert result.report["residual_body_fraction"] == 0.0


def test_planted_mannequin_patch_is_flagged(
    clean: tuple[Scene, GhostResult, ColourModel, str],
) -> None:
    _, result, colours, name = clean
    rgb, alpha = _arrays(result)
    # A 20x20 patch of mannequin (or skin) left on the garment's chest: 0.3% of the frame.
    rng = np.random.default_rng(0)
    patch = np.asarray(CASES[name][1], float) + rng.normal(0, 2.5, (20, 20, 3))
    rgb[170:190, 150:170] = np.clip(patch, 0, 255).astype(np.uint8)
    assert erode(alpha >= 0.5, 2)[170:190, 150:170].all()
    report = quality_report(rgb, alpha, colours)
    assert report.residual_body_fraction > MAX_RESIDUAL_BODY
    assert report.needs_review
    assert any("residual body" in r for r in report.reasons)
    # The same measurement without the patch stays clean.
    clean_rgb, _ = _arrays(result)
    assert not quality_report(clean_rgb, alpha, colours).needs_review


def test_visible_seam_is_flagged() -> None:
    scene = make_scene("top")
    result = ghost_mannequin(scene.pil(), inpainter=FlatFillTestInpainter(), params=PARAMS)
    assert result.report["needs_review"] is True
    assert any("seam" in str(r) for r in result.report["reasons"])  # type: ignore[attr-defined]
    seam = result.report["seam_delta_e_median"]
    assert isinstance(seam, float) and seam > 40.0


def test_printed_garment_seam_is_judged_against_its_own_texture() -> None:
    scene = make_scene("top", textured=True)
    good = ghost_mannequin(scene.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    bad = ghost_mannequin(scene.pil(), inpainter=FlatFillTestInpainter(), params=PARAMS)
    assert good.report["needs_review"] is False, good.report["reasons"]
    assert bad.report["needs_review"] is True


def test_coverage_and_frame_checks() -> None:
    colours = segment(make_scene("top").image).colours
    rgb = np.full((64, 64, 3), 255, np.uint8)
    empty = quality_report(rgb, np.zeros((64, 64), np.float32), colours)
    assert empty.needs_review and any("covers only" in r for r in empty.reasons)
    full = quality_report(rgb, np.ones((64, 64), np.float32), colours)
    assert any("backdrop not removed" in r for r in full.reasons)
    assert full.touches_frame and any("touches the frame" in r for r in full.reasons)
    alpha = np.zeros((64, 64), np.float32)
    alpha[16:48, 16:48] = 1.0
    fine = quality_report(rgb, alpha, colours)
    assert not fine.needs_review
    assert fine.alpha_coverage == pytest.approx(0.25)
    assert fine.as_dict()["reasons"] == []


# --- checks that do not trust the segmentation ------------------------------------------------


def _context_case(
    name: str = "model-skin-tones", seed: int = 0
) -> tuple[Scene, GhostJob, GhostResult]:
    scene = make_hard_scene(name, seed=seed)
    return (scene, *run_ghost(scene.image, PARAMS))


def _context(job: GhostJob, **changes: object) -> QualityContext:
    seg = job.segmentation
    assert seg.foreground is not None
    fields: dict[str, object] = {
        "source": job.source,
        "foreground": seg.foreground,
        "fit": seg.fit,
        "backdrop_explained": seg.fit.explained if seg.fit is not None else 1.0,
        "garment_type": job.regions.garment_type,
        "openings": tuple(o.kind for o in job.regions.openings),
        "removed_body_pixels": int(job.regions.remove.sum()),
    }
    fields.update(changes)
    return QualityContext(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_case() -> tuple[Scene, GhostJob, GhostResult]:
    return _context_case()


def _measure(
    case: tuple[Scene, GhostJob, GhostResult], alpha: NDArray[np.float32], **changes: object
) -> QualityReport:
    _, job, result = case
    rgb = np.asarray(result.image.convert("RGB"))
    return quality_report(
        rgb,
        alpha,
        job.segmentation.colours,
        generated=job.generate,
        garment=job.segmentation.garment,
        context=_context(job, **changes),
    )


def test_a_clean_result_passes_every_check(model_case: tuple[Scene, GhostJob, GhostResult]) -> None:
    _, _, result = model_case
    assert result.report["needs_review"] is False, result.report["reasons"]
    assert result.report["skin_fraction"] == 0.0


def test_skin_kept_in_the_output_is_found_afresh(
    model_case: tuple[Scene, GhostJob, GhostResult],
) -> None:
    scene, _, result = model_case
    alpha = (np.asarray(result.alpha) / 255.0).astype(np.float32)
    skin = scene.extras["skin"]
    assert isinstance(skin, np.ndarray)
    alpha[skin] = 1.0  # as if the segmentation had kept the arms and the face
    report = _measure(model_case, alpha)
    assert report.skin_fraction > 0.05
    assert any("skin left" in r for r in report.reasons)


def test_openings_are_checked_against_the_garment_type(
    model_case: tuple[Scene, GhostJob, GhostResult],
) -> None:
    _, _, result = model_case
    alpha = (np.asarray(result.alpha) / 255.0).astype(np.float32)
    three = _measure(model_case, alpha, garment_type="top", openings=("neck", *["sleeve"] * 3))
    assert any("3 sleeve openings for a top" in r for r in three.reasons)
    skirt = _measure(model_case, alpha, garment_type="skirt", openings=("neck", "sleeve"))
    assert any("sleeve openings for a skirt" in r for r in skirt.reasons)
    none = _measure(model_case, alpha, openings=())
    assert any("no opening was found" in r for r in none.reasons)
    fine = _measure(model_case, alpha)
    assert not fine.needs_review, fine.reasons


def test_pieces_threads_backdrop_and_unused_interior_are_flagged(
    model_case: tuple[Scene, GhostJob, GhostResult],
) -> None:
    scene, _, result = model_case
    alpha = (np.asarray(result.alpha) / 255.0).astype(np.float32)
    apart = alpha.copy()
    apart[20:60, 10:40] = 1.0  # a piece of the backdrop in the corner, away from the garment
    pieces = _measure(model_case, apart)
    assert pieces.main_piece_fraction < 0.97
    assert any("in pieces" in r for r in pieces.reasons)
    assert any("backdrop left" in r for r in pieces.reasons)
    ys, xs = np.nonzero(alpha >= 0.5)
    hanging = alpha.copy()
    x = int(np.median(xs))
    hanging[ys.max() : ys.max() + 40, x - 1 : x + 2] = 1.0  # a thread below the hem
    assert any("hang below" in r for r in _measure(model_case, hanging).reasons)
    interior = _measure(model_case, alpha, interior_sent=True, interior_used=False)
    assert any("interior shot" in r for r in interior.reasons)
    poor = _measure(model_case, alpha, backdrop_explained=0.4)
    assert any("backdrop fit explains" in r for r in poor.reasons)
    assert scene.garment.any()
