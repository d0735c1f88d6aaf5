"""The classical ghost pipeline on the hard synthetic scenes (``tests.garments.HARD_SCENES``):
people with skin and hair, prints, floors, frame-crossing garments, existing ghost images,
busy scenes, and light garments on light mannequins and backdrops.

Thresholds are set a little under what the scenes measure (docs/BENCHMARKS.md has the table);
each family is run at three seeds. Where the classical default cannot separate the garment
(light on light), the result must at least be sent for review; the cases where it is not yet
are marked as known failures that must flip when fixed.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from tests.garments import Scene, iou, make_hard_scene, run_ghost
from workers.pipelines.ghost.pipeline import (
    BusyScene,
    GhostJob,
    GhostParams,
    GhostResult,
    prepare_ghost,
)
from workers.pipelines.ghost.segmentation import SegmenterOutput, fit_backdrop

PARAMS = GhostParams(size=480, steps=4, seed=3)
SEEDS = (0, 1, 2)


@cache
def run(name: str, seed: int) -> tuple[Scene, GhostJob, GhostResult]:
    scene = make_hard_scene(name, seed=seed)
    return (scene, *run_ghost(scene.image, PARAMS))


def alpha_iou(scene: Scene, result: GhostResult) -> float:
    alpha = np.asarray(result.alpha) >= 128
    return iou(alpha, scene.garment | scene.hidden)


@pytest.mark.parametrize("seed", SEEDS)
def test_model_skin_tones_skin_and_hair_are_body(seed: int) -> None:
    scene, job, result = run("model-skin-tones", seed)
    if result.report["needs_review"]:
        return  # a miss that is flagged is acceptable; the two others must be right
    assert alpha_iou(scene, result) >= 0.95
    skin = scene.extras["skin"]
    assert isinstance(skin, np.ndarray)
    kept = (np.asarray(result.alpha) >= 128) & skin & ~job.generate
    assert kept.sum() <= 0.002 * skin.sum()


def test_model_skin_tones_mostly_right() -> None:
    good = [not run("model-skin-tones", s)[2].report["needs_review"] for s in SEEDS]
    assert sum(good) >= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_dress_close_to_skin(seed: int) -> None:
    scene, _, result = run("model-skin-dress", seed)
    assert alpha_iou(scene, result) >= 0.97
    assert result.report["body_kind"] == "skin"


@pytest.mark.parametrize("seed", SEEDS)
def test_floor_and_wall(seed: int) -> None:
    scene, _, result = run("floor-corner", seed)
    assert alpha_iou(scene, result) >= 0.96


def test_a_floor_is_fitted_as_its_own_plane() -> None:
    found = [fit_backdrop(make_hard_scene("floor-corner", seed=s).image).horizon for s in (2, 3)]
    for seed, horizon in zip((2, 3), found, strict=True):
        truth = make_hard_scene("floor-corner", seed=seed).extras["horizon_y"]
        assert horizon is not None and abs(horizon - float(truth)) <= 12  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_garment_crossing_the_frame_is_no_floor(seed: int) -> None:
    scene, _, result = run("frame-crossing", seed)
    assert fit_backdrop(scene.image).horizon is None
    assert alpha_iou(scene, result) >= 0.93
    assert result.report["touches_frame"] is True and result.report["needs_review"] is True


@pytest.mark.parametrize("seed", SEEDS)
def test_an_existing_ghost_image_is_cut_out_untouched(seed: int) -> None:
    scene, job, result = run("ghost-already", seed)
    assert job.request is None  # nothing generated: the real inside stays
    assert result.report["body_found"] is False and "note" in result.report
    assert alpha_iou(scene, result) >= 0.96
    inside = scene.extras["interior"]
    assert isinstance(inside, np.ndarray)
    source = job.source.astype(int)
    out = np.asarray(result.image.convert("RGB")).astype(int)
    solid = inside & (np.asarray(result.alpha) == 255)
    assert np.abs(out[solid] - source[solid]).max() <= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_a_busy_scene_is_refused(seed: int) -> None:
    with pytest.raises(BusyScene) as caught:
        prepare_ghost(make_hard_scene("busy-scene", seed=seed).image, params=PARAMS)
    assert caught.value.code == "no-backdrop-found"


@pytest.mark.parametrize("name", ["printed-logo", "white-on-white"])
@pytest.mark.parametrize("seed", SEEDS)
def test_what_the_classical_default_gets_wrong_is_sent_for_review(name: str, seed: int) -> None:
    scene, _, result = run(name, seed)
    if alpha_iou(scene, result) < 0.9:
        assert result.report["needs_review"] is True, result.report


@pytest.mark.xfail(
    strict=True,
    reason="cream on a cream mannequin and a white top on a white backdrop: the classical "
    "default takes the wrong garment and nothing in the output tells it; needs the learned "
    "segmenters",
)
@pytest.mark.parametrize("name", ["cream-on-cream", "model-white-top"])
def test_light_on_light_wrong_results_are_sent_for_review(name: str) -> None:
    for seed in SEEDS:
        scene, _, result = run(name, seed)
        if alpha_iou(scene, result) < 0.9:
            assert result.report["needs_review"] is True


def test_a_garment_filling_the_frame_is_not_taken_for_a_busy_scene() -> None:
    # A close crop of a dress: it hides the backdrop along most of the border, but with its
    # own few colours, unlike a shop's shelves.
    image = make_hard_scene("model-skin-dress", seed=0).image
    h, w = image.shape[:2]
    crop = np.ascontiguousarray(image[h // 3 : 2 * h // 3 + 40, w // 4 : 3 * w // 4])
    assert fit_backdrop(crop).explained < 0.5
    job = prepare_ghost(crop, params=PARAMS)
    assert job.segmentation.garment.any()


def test_a_learned_segmenter_or_caller_mask_is_not_held_to_a_studio_backdrop() -> None:
    scene = make_hard_scene("busy-scene", seed=0)

    class Known:
        def predict(self, rgb: np.ndarray) -> SegmenterOutput:
            return SegmenterOutput(
                garment=scene.garment.astype(np.float32), body=scene.body.astype(np.float32)
            )

    job = prepare_ghost(scene.image, params=PARAMS, segmenter=Known())
    assert job.segmentation.source == "model"
    assert job.segmentation.garment.any()
    masked = prepare_ghost(scene.image, params=PARAMS, garment_mask=scene.garment)
    assert masked.segmentation.source == "supplied"
