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
    make_scene,
)
from workers.pipelines.ghost.pipeline import GhostParams, GhostResult, ghost_mannequin
from workers.pipelines.ghost.quality import MAX_RESIDUAL_BODY, quality_report
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
