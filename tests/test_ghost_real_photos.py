"""ghost_mannequin on real catalogue photos (``../shared/ghost-eval``), with the classical
segmentation and no learned weights.

Two photos come with the studio retoucher's own result, pixel-aligned: the final alpha is
measured against its silhouette. For the others the verdicts below were taken by looking at
the contact sheets of ``bench/ghost_eval.py``: a good result must not be sent for review, a
wrong one must be. The photos are read where CI and every checkout have them, beside the
repository; they are never copied into it.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from tests.garments import run_ghost
from workers.pipelines.ghost.pipeline import (
    BusyScene,
    GhostJob,
    GhostParams,
    GhostResult,
    prepare_ghost,
)
from workers.pipelines.ghost.segmentation import fit_backdrop

EVAL = Path(__file__).resolve().parents[2] / "shared" / "ghost-eval"
PARAMS = GhostParams(size=768, steps=4, seed=1)

if not EVAL.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(f"the real photos are missing: {EVAL}")
    pytest.skip(f"no real photos at {EVAL}", allow_module_level=True)

# By eye, on the contact sheets (see docs/BENCHMARKS.md for the table).
GOOD = [
    "m01_hoodie_grey",
    "m02_hoodie_burgundy",
    "m06_banana_tank",
    "m08_jersey_arms",
    "m11_sweater_dark_mannequin",
    "p01_collar_shirt_model",
    "p03_beige_dress_model",
]
# Wrong: seams along the legs and a strand of hair kept (p05).
WRONG = ["p05_sequin_dress_bluebg"]


@cache
def run(name: str) -> tuple[GhostJob, GhostResult]:
    return run_ghost(Image.open(EVAL / f"{name}.png"), PARAMS)


def retoucher_silhouette(name: str, size: tuple[int, int]) -> NDArray[np.bool_]:
    """Where the retoucher's after-image is not white, holes inside it filled."""
    arr = np.asarray(Image.open(EVAL / f"{name}.retouched.png").convert("RGB"), np.int16)
    ink = (255 - arr).max(axis=2) > 12
    _, labels = cv2.connectedComponents((~ink).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    silhouette = ink | (~ink & ~np.isin(labels, border))
    resized = cv2.resize(silhouette.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return np.asarray(resized >= 0.5)


def alpha_iou(name: str) -> float:
    _, result = run(name)
    alpha = np.asarray(result.alpha) >= 128
    truth = retoucher_silhouette(name, (alpha.shape[1], alpha.shape[0]))
    return float((alpha & truth).sum()) / float((alpha | truth).sum())


def test_hoodie_alpha_matches_the_retoucher() -> None:
    assert alpha_iou("m01_hoodie_grey") >= 0.97


def test_pale_bodysuit_alpha_matches_the_retoucher() -> None:
    assert alpha_iou("m04_bodysuit_paleblue") >= 0.90
    # A sliver of the white mannequin stays beside the right strap: reported, not hidden.
    _, result = run("m04_bodysuit_paleblue")
    assert result.report["needs_review"] is True


@pytest.mark.parametrize("name", ["p01_collar_shirt_model", "p03_beige_dress_model"])
def test_no_skin_is_kept_on_models(name: str) -> None:
    _, result = run(name)
    assert result.report["body_kind"] == "skin"
    assert float(result.report["skin_fraction"]) <= 0.001, result.report  # type: ignore[arg-type]
    assert result.report["residual_body_fraction"] == 0.0


def test_a_sequinned_dress_filling_the_frame_is_processed() -> None:
    # Cropped to the dress: the backdrop shows along less than half of the border, the rest
    # is the print; that is a garment filling the frame, not a shop.
    image = np.asarray(Image.open(EVAL / "p05_sequin_dress_bluebg.png").convert("RGB"))
    h, w = image.shape[:2]
    crop = np.ascontiguousarray(image[int(0.15 * h) : int(0.55 * h), int(0.35 * w) : int(0.65 * w)])
    assert fit_backdrop(crop).explained < 0.5
    job = prepare_ghost(crop, params=PARAMS)
    assert job.segmentation.garment.mean() > 0.3


def test_a_shop_scene_is_refused() -> None:
    with pytest.raises(BusyScene) as caught:
        prepare_ghost(Image.open(EVAL / "x01_dress_hanger_store.png"), params=PARAMS)
    assert caught.value.code == "no-backdrop-found"


@pytest.mark.parametrize("name", GOOD)
def test_good_results_are_not_sent_for_review(name: str) -> None:
    _, result = run(name)
    assert result.report["needs_review"] is False, result.report["reasons"]


@pytest.mark.parametrize("name", WRONG)
def test_wrong_results_are_sent_for_review(name: str) -> None:
    _, result = run(name)
    assert result.report["needs_review"] is True


@pytest.mark.parametrize(
    ("name", "garment_type"),
    [
        ("m01_hoodie_grey", "hoodie"),
        ("m06_banana_tank", "sleeveless"),
        ("m08_jersey_arms", "top"),
        ("m11_sweater_dark_mannequin", "top"),
        ("p01_collar_shirt_model", "sleeveless"),
        ("p03_beige_dress_model", "dress"),
        ("p05_sequin_dress_bluebg", "dress"),
    ],
)
def test_garment_type(name: str, garment_type: str) -> None:
    job, result = run(name)
    assert job.regions.garment_type == garment_type
    assert garment_type.split()[0] in result.report["prompt"]  # type: ignore[operator]


@pytest.mark.parametrize("name", [*GOOD, *WRONG, "m04_bodysuit_paleblue"])
def test_openings_are_few_and_the_neck_stays_inside_the_garment(name: str) -> None:
    job, _ = run(name)
    kinds = [o.kind for o in job.regions.openings]
    assert kinds.count("neck") == 1
    assert kinds.count("sleeve") + kinds.count("armhole") <= 2
    assert kinds.count("hem") <= 1
    garment = job.segmentation.garment
    # Never the head: the neck region stays within the garment's outline (its hull).
    contours, _ = cv2.findContours(
        garment.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull = np.zeros(garment.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(contours)), 1)
    neck = job.regions.neck
    grown = cv2.dilate(hull, np.ones((9, 9), np.uint8)) > 0
    assert (neck & ~grown).sum() <= 0.01 * neck.sum()
    assert neck.sum() <= 0.15 * garment.sum()


def test_the_hood_is_reconstructed_where_the_stuffing_was() -> None:
    job, _ = run("m01_hoodie_grey")
    (neck,) = [o for o in job.regions.openings if o.kind == "neck"]
    # The stuffing inside the hood, enclosed by it, is the neck opening seen all round.
    assert neck.centre[1] < 0.35 * job.source.shape[0]
    assert job.regions.neck.sum() > 0
