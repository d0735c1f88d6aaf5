"""Neck joint: aligning the studio's interior shot with the main photo, with a known warp."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from tests.garments import DiffusionTestInpainter, InteriorPair, make_interior_pair
from workers.pipelines.ghost.neckjoint import Alignment, align_interior, apply_neck_joint
from workers.pipelines.ghost.pipeline import GhostParams, ghost_mannequin, prepare_ghost
from workers.pipelines.ghost.segmentation import dilate

# Measured: 0.25 px (features, homography), 0.10 px (ECC, rigid warp on a plain garment).
MAX_CORNER_ERROR_PX = 2.0


def _rigid(angle_deg: float, tx: float, ty: float) -> NDArray[np.float64]:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a), tx], [math.sin(a), math.cos(a), ty], [0, 0, 1]])


def _corner_error(pair: InteriorPair, alignment: Alignment) -> float:
    h, w = pair.interior.shape[:2]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    truth = cv2.perspectiveTransform(corners.reshape(-1, 1, 2), pair.interior_to_main)
    return float(np.linalg.norm(alignment.project(corners) - truth.reshape(-1, 2), axis=1).max())


@pytest.fixture(scope="module")
def textured_pair() -> InteriorPair:
    return make_interior_pair(textured=True)


def test_feature_homography_recovers_known_warp(textured_pair: InteriorPair) -> None:
    pair = textured_pair
    search = dilate(pair.scene.neck, 60)
    alignment = align_interior(
        pair.scene.image, pair.interior, search=search, exclude=pair.scene.neck
    )
    assert alignment.method == "features"
    assert alignment.inliers >= 30
    assert _corner_error(pair, alignment) <= MAX_CORNER_ERROR_PX


def test_low_texture_falls_back_to_phase_correlation_and_ecc() -> None:
    pair = make_interior_pair(textured=False, warp=_rigid(3.0, -6.0, 4.0))
    search = dilate(pair.scene.neck, 60)
    alignment = align_interior(
        pair.scene.image, pair.interior, search=search, exclude=pair.scene.neck
    )
    assert alignment.method == "ecc"
    assert _corner_error(pair, alignment) <= MAX_CORNER_ERROR_PX


def test_interior_is_composited_into_the_hidden_neck(textured_pair: InteriorPair) -> None:
    pair = textured_pair
    neck = pair.scene.neck
    joint = apply_neck_joint(pair.scene.image, pair.interior, neck, garment=pair.scene.garment)
    assert np.array_equal(joint.covered, neck)
    assert not joint.remaining.any()
    # The woven label lands where it was: bright and neutral (the mannequin there is beige).
    label = joint.image[pair.label & ~dilate(~pair.label, 1)].astype(float).mean(0)
    assert label[2] > 200 and abs(label[0] - label[2]) < 25
    # The rest of the opening shows the collar's dark inner back, not the mannequin.
    inner = neck & ~dilate(pair.label, 2)
    assert joint.image[inner].astype(float).mean() < 80
    # Outside the hidden region the photo is untouched, but for a one-pixel feather.
    outside = ~dilate(neck, 2)
    assert np.array_equal(joint.image[outside], pair.scene.image[outside])


def test_partial_coverage_leaves_the_rest_for_generation() -> None:
    # The shot's right edge falls at x = 180 of the main photo, mid-way across the neck.
    pair = make_interior_pair(textured=True, warp=_rigid(2.0, -10.0, 0.0), size=(80, 180))
    neck = pair.scene.neck
    joint = apply_neck_joint(pair.scene.image, pair.interior, neck, garment=pair.scene.garment)
    assert joint.covered.any() and joint.remaining.any()
    assert np.array_equal(joint.covered | joint.remaining, neck)
    assert not (joint.covered & joint.remaining).any()
    xs = np.nonzero(joint.remaining)[1]
    assert xs.min() > np.nonzero(neck)[1].min()  # what is left lies on the uncovered side


def test_pipeline_generates_only_what_the_interior_does_not_cover(
    textured_pair: InteriorPair,
) -> None:
    pair = textured_pair
    scene = pair.scene
    params = GhostParams(size=480, steps=4)
    job = prepare_ghost(scene.pil(), params=params, interior=pair.interior)
    joint = job.info["neck_joint"]
    assert isinstance(joint, dict) and joint["used"] and joint["method"] == "features"
    assert joint["covered_fraction"] > 0.95
    assert job.request is not None  # sleeves and hem still need generating
    assert not (job.generate & job.covered).any()
    assert not (job.generate & job.regions.neck).any()

    # With only the neck opening to fill (the body mask holds just the head and neck), the
    # interior covers everything and the inpainter is not called at all.
    top_body = scene.body.copy()
    top_body[135:] = False
    inpainter = DiffusionTestInpainter()
    result = ghost_mannequin(
        scene.pil(),
        inpainter=inpainter,
        params=params,
        garment_mask=scene.garment,
        body_mask=top_body,
        interior=pair.interior,
    )
    assert inpainter.requests == []
    assert result.gpu_seconds == 0.0
    alpha = np.asarray(result.alpha) / 255.0
    assert (alpha[scene.neck] >= 0.5).mean() > 0.97
