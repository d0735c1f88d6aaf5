"""Inner garment reconstruction: hidden regions found from masks, against known geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.garments import (
    BURGUNDY,
    GREEN,
    MANNEQUIN_BLACK,
    RED,
    TEAL,
    Scene,
    centroid,
    iou,
    make_scene,
)
from workers.pipelines.ghost.igr import IgrRegions, infer_garment_type, reconstruct_regions
from workers.pipelines.ghost.segmentation import dilate, segment

SCENES: dict[str, dict[str, object]] = {
    "tee": {"garment": "top"},
    "tee-deep-neck": {"garment": "top", "neck_depth": 45.0},
    "tee-shallow-neck": {"garment": "top", "neck_depth": 10.0},
    "long-sleeve": {
        "garment": "top",
        "long_sleeves": True,
        "garment_rgb": RED,
        "mannequin_rgb": MANNEQUIN_BLACK,
    },
    "dress-mannequin": {"garment": "dress", "garment_rgb": TEAL},
    "dress-model": {"garment": "dress", "wearer": "model", "garment_rgb": BURGUNDY},
    "trousers": {"garment": "trousers", "garment_rgb": GREEN},
}

# Measured on masks from the classical segmentation (min over the scenes above): neck 0.92,
# union of sleeve regions 0.56, union of hem regions 0.59; centroids within 3 px of the truth.
MIN_NECK_IOU = 0.85
MIN_SLEEVE_IOU = 0.4
MIN_HEM_IOU = 0.4
MAX_CENTRE_ERROR_PX = 4.0


@pytest.fixture(scope="module", params=list(SCENES), ids=list(SCENES))
def case(request: pytest.FixtureRequest) -> tuple[Scene, IgrRegions]:
    scene = make_scene(**SCENES[request.param])  # type: ignore[arg-type]
    seg = segment(scene.image)
    return scene, reconstruct_regions(seg.garment, seg.body)


def _matched(found: list[tuple[float, float]], truth: list[tuple[float, float]]) -> float:
    """Worst distance from each true centre to the nearest found one."""
    return max(min(math.dist(t, f) for f in found) for t in truth)


def test_garment_type_is_inferred(case: tuple[Scene, IgrRegions]) -> None:
    scene, regions = case
    assert regions.garment_type == scene.garment_type


def test_neck_region_matches_ground_truth(case: tuple[Scene, IgrRegions]) -> None:
    scene, regions = case
    assert iou(regions.neck, scene.neck) >= MIN_NECK_IOU
    (neck,) = [o for o in regions.openings if o.kind == "neck"]
    assert neck.outward[1] < -0.9  # the back of the collar / waistband rises above the opening


def test_sleeve_openings_present_and_located(case: tuple[Scene, IgrRegions]) -> None:
    scene, regions = case
    sleeves = [o for o in regions.openings if o.kind == "sleeve"]
    assert len(sleeves) == len(scene.sleeves)
    if scene.sleeves:
        found = [centroid(o.region) for o in sleeves]
        assert _matched(found, scene.sleeve_centres) <= MAX_CENTRE_ERROR_PX
        assert iou(regions.sleeves, np.any(scene.sleeves, axis=0)) >= MIN_SLEEVE_IOU
        for o in sleeves:
            assert o.outward[1] > 0.8  # arms hang: the sleeve opens downwards and outwards


def test_hem_openings_present_and_located(case: tuple[Scene, IgrRegions]) -> None:
    scene, regions = case
    hems = [o for o in regions.openings if o.kind == "hem"]
    assert len(hems) == len(scene.hems)
    found = [centroid(o.region) for o in hems]
    assert _matched(found, scene.hem_centres) <= MAX_CENTRE_ERROR_PX
    assert iou(regions.hem, np.any(scene.hems, axis=0)) >= MIN_HEM_IOU
    for o in hems:
        assert o.outward[1] > 0.95


def test_body_outside_hidden_regions_is_removed(case: tuple[Scene, IgrRegions]) -> None:
    scene, regions = case
    assert not (regions.remove & regions.hidden).any()
    truth = scene.body & ~dilate(scene.hidden, 2)
    assert (regions.remove[truth]).mean() >= 0.97


def test_inpaint_mask_reaches_into_the_garment_only_a_seam(
    case: tuple[Scene, IgrRegions],
) -> None:
    scene, regions = case
    assert (regions.inpaint >= regions.hidden).all()
    extra = regions.inpaint & ~regions.hidden
    assert extra.any()
    seg = segment(scene.image)
    assert not (extra & ~seg.garment).any()
    assert not (extra & ~dilate(regions.hidden, regions.seam_px)).any()


def test_ground_truth_masks_give_the_same_openings() -> None:
    scene = make_scene("top")
    regions = reconstruct_regions(scene.garment, scene.body)
    assert iou(regions.neck, scene.neck) >= 0.95
    assert [o.kind for o in regions.openings].count("sleeve") == 2
    assert [o.kind for o in regions.openings].count("hem") == 1


@pytest.mark.parametrize("kind", ["top", "dress", "trousers"])
def test_infer_garment_type_from_silhouette(kind: str) -> None:
    scene = make_scene(kind)  # type: ignore[arg-type]
    assert infer_garment_type(scene.garment) == kind


def test_explicit_garment_type_wins() -> None:
    scene = make_scene("dress", garment_rgb=TEAL)
    regions = reconstruct_regions(scene.garment, scene.body, garment_type="top")
    assert regions.garment_type == "top"


def test_no_body_means_nothing_hidden() -> None:
    scene = make_scene("top")
    regions = reconstruct_regions(scene.garment, np.zeros_like(scene.body))
    assert not regions.hidden.any() and not regions.inpaint.any() and not regions.openings
