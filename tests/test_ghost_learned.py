"""Learned segmenters from local folders: tiny random SegFormer and SAM written and loaded by
the real code, the label grouping, the folder check at worker start, and the wiring into
``segment()`` and the ghost_mannequin job."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# With two shared cores, more threads make these small models many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from tests.garments import DiffusionTestInpainter, Scene, iou, make_scene
from workers import gpu
from workers.models.runtime import ModelDirError
from workers.models.tiny import CLOTHES_LABELS, make_tiny_model, make_tiny_parser
from workers.pipelines.ghost.learned import (
    ClothesParser,
    CombinedSegmenter,
    PromptedForeground,
    check_segmenter_dirs,
    foreground_box,
    label_groups,
    load_segmenter,
    normalise_label,
)
from workers.pipelines.ghost.segmentation import RGBArray, SegmenterOutput, segment

LEARNED_LOG = "workers.pipelines.ghost.learned"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL checkpoint with both tiny segmenters beside it."""
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("tiny-with-segmenters")
    make_tiny_model(directory, segmenters=True)
    return directory


@pytest.fixture(scope="module")
def segmenter(model_dir: Path) -> CombinedSegmenter:
    loaded = load_segmenter(model_dir, device="cpu")
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def tee() -> Scene:
    return make_scene("top")


@pytest.fixture
def copied(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def _probabilities(out: SegmenterOutput, shape: tuple[int, int]) -> None:
    for prob in (out.garment, out.body):
        if prob is None:
            continue
        assert prob.shape == shape and prob.dtype == np.float32
        assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


# --- tiny models through the real loading code


def test_tiny_segmenters_are_small_and_load_as_the_real_classes(
    model_dir: Path, segmenter: CombinedSegmenter
) -> None:
    found = check_segmenter_dirs(model_dir)
    assert found == {
        "clothes": model_dir / "segmentation" / "clothes",
        "foreground": model_dir / "segmentation" / "foreground",
    }
    for folder in found.values():
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
        assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    assert segmenter.names == ["clothes", "foreground"]
    assert segmenter.parser is not None and segmenter.foreground is not None
    assert type(segmenter.parser.model).__name__ == "SegformerForSemanticSegmentation"
    assert type(segmenter.foreground.model).__name__ == "SamModel"
    assert segmenter.parser.device.type == "cpu" and segmenter.parser.dtype == torch.float32
    id2label = segmenter.parser.model.config.id2label
    assert [id2label[i] for i in range(len(id2label))] == list(CLOTHES_LABELS)


@pytest.mark.parametrize("shape", [(480, 360), (61, 97)])
def test_parser_gives_group_probabilities_at_the_input_size(
    segmenter: CombinedSegmenter, shape: tuple[int, int]
) -> None:
    assert segmenter.parser is not None
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    groups = segmenter.parser.group_probabilities(rgb)
    assert groups.shape == (3, *shape) and groups.dtype == np.float32
    np.testing.assert_allclose(groups.sum(axis=0), 1.0, atol=1e-4)
    out = segmenter.parser.predict(rgb)
    assert out.body is not None
    _probabilities(out, shape)
    np.testing.assert_array_equal(out.garment, groups[0])


def test_prompted_foreground_is_the_subject_without_body(
    segmenter: CombinedSegmenter, tee: Scene
) -> None:
    assert segmenter.foreground is not None
    out = segmenter.foreground.predict(tee.image)
    assert out.body is None
    _probabilities(out, tee.image.shape[:2])
    # A box of the caller's, and a photo with nothing in front of the backdrop.
    box = segmenter.foreground.probability(tee.image, box=(10, 10, 100, 200))
    assert box.shape == tee.image.shape[:2]
    blank = np.full((64, 48, 3), 230, np.uint8)
    assert segmenter.foreground.predict(blank).garment.shape == (64, 48)


def test_combined_garment_lies_within_parser_and_subject(
    segmenter: CombinedSegmenter, tee: Scene
) -> None:
    assert segmenter.parser is not None and segmenter.foreground is not None
    out = segmenter.predict(tee.image)
    _probabilities(out, tee.image.shape[:2])
    parsed = segmenter.parser.predict(tee.image)
    subject = segmenter.foreground.probability(tee.image)
    assert out.body is not None and parsed.body is not None
    assert np.all(out.garment <= parsed.garment + 1e-6)
    assert np.all(out.garment <= subject + 1e-6)
    assert np.all(out.body >= parsed.body - 1e-6)


def test_each_segmenter_alone(model_dir: Path, tee: Scene) -> None:
    parser = ClothesParser.load(model_dir / "segmentation" / "clothes", device="cpu")
    foreground = PromptedForeground.load(model_dir / "segmentation" / "foreground", device="cpu")
    alone = CombinedSegmenter(parser=parser)
    assert alone.names == ["clothes"] and alone.predict(tee.image).body is not None
    alone = CombinedSegmenter(foreground=foreground)
    assert alone.names == ["foreground"] and alone.predict(tee.image).body is None
    with pytest.raises(ValueError, match="needs a parser"):
        CombinedSegmenter()


# --- label names


def test_label_names_map_to_groups(caplog: pytest.LogCaptureFixture) -> None:
    id2label = {
        "0": "background",
        "1": "UPPER_CLOTHES",
        "2": "left arm",
        "3": "Right-Leg",
        "4": "Sunglasses",
        "5": "Coat",
        "6": "Hair",
        "7": "left_shoe",
        "8": "Tail",
        "9": "Antenna",
    }
    with caplog.at_level(logging.WARNING, logger=LEARNED_LOG):
        groups = label_groups(id2label)
    assert groups == {
        0: "other",
        1: "garment",
        2: "body",
        3: "body",
        4: "other",
        5: "garment",
        6: "body",
        7: "other",
        8: "other",
        9: "other",
    }
    unknown = [r for r in caplog.records if "not recognised" in r.getMessage()]
    assert len(unknown) == 1
    assert "Tail" in unknown[0].getMessage() and "Antenna" in unknown[0].getMessage()
    assert normalise_label("Upper-clothes") == normalise_label("upper_clothes") == "upperclothes"


def test_the_public_clothes_labels_group_as_documented() -> None:
    groups = label_groups(dict(enumerate(CLOTHES_LABELS)))
    by_group = {
        g: {CLOTHES_LABELS[i] for i, x in groups.items() if x == g} for g in groups.values()
    }
    assert by_group["garment"] == {"Upper-clothes", "Skirt", "Pants", "Dress", "Belt", "Scarf"}
    assert by_group["body"] == {
        "Hair",
        "Face",
        "Left-leg",
        "Right-leg",
        "Left-arm",
        "Right-arm",
    }
    assert "Background" in by_group["other"] and "Bag" in by_group["other"]


def test_labels_without_a_garment_are_an_error_naming_them(model_dir: Path, tmp_path: Path) -> None:
    labels = {0: "Background", 1: "Person", 2: "Car"}
    with pytest.raises(ValueError, match=r"no garment label .*\(Background, Person, Car\)"):
        label_groups(labels)
    # A parser of the same size as the tiny one with such labels on disk: refused by the
    # folder check and by the loader.
    labels.update({i: f"Thing{i}" for i in range(3, len(CLOTHES_LABELS))})
    model = make_tiny_parser()
    model.config.id2label = labels
    model.config.label2id = {v: k for k, v in labels.items()}
    folder = tmp_path / "segmentation" / "clothes"
    model.save_pretrained(folder)
    shutil.copy(
        model_dir / "segmentation" / "clothes" / "preprocessor_config.json",
        folder / "preprocessor_config.json",
    )
    with pytest.raises(ModelDirError, match=r"segmentation/clothes/config\.json: no garment"):
        check_segmenter_dirs(tmp_path)
    with pytest.raises(ModelDirError, match="Person"):
        ClothesParser.load(folder, device="cpu")


# --- the folder check


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("clothes/model.safetensors", "missing segmentation/clothes/model.safetensors (weights)"),
        ("clothes/config.json", "missing segmentation/clothes/config.json"),
        (
            "clothes/preprocessor_config.json",
            "missing segmentation/clothes/preprocessor_config.json",
        ),
        (
            "foreground/model.safetensors",
            "missing segmentation/foreground/model.safetensors (weights)",
        ),
        (
            "foreground/preprocessor_config.json",
            "missing segmentation/foreground/preprocessor_config.json",
        ),
    ],
)
def test_a_half_present_folder_names_the_missing_file(
    copied: Path, remove: str, named: str
) -> None:
    (copied / "segmentation" / remove).unlink()
    with pytest.raises(ModelDirError) as caught:
        check_segmenter_dirs(copied)
    assert caught.value.problems == [named]
    assert named in str(caught.value)
    with pytest.raises(ModelDirError, match="segmentation/"):
        load_segmenter(copied, device="cpu")


def test_an_empty_folder_lists_every_missing_file(copied: Path) -> None:
    shutil.rmtree(copied / "segmentation" / "foreground")
    (copied / "segmentation" / "foreground").mkdir()
    with pytest.raises(ModelDirError) as caught:
        check_segmenter_dirs(copied)
    assert len(caught.value.problems) == 3, caught.value.problems
    assert all("segmentation/foreground/" in p for p in caught.value.problems)


def test_sharded_weights_need_their_shards(copied: Path) -> None:
    folder = copied / "segmentation" / "clothes"
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", '
        '"b": "model-00002-of-00002.safetensors"}}'
    )
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError) as caught:
        check_segmenter_dirs(copied)
    assert caught.value.problems == [
        "missing segmentation/clothes/model-00002-of-00002.safetensors (weight shard)"
    ]


def test_absent_folders_mean_classical(copied: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.rmtree(copied / "segmentation" / "foreground")
    assert set(check_segmenter_dirs(copied)) == {"clothes"}
    with caplog.at_level(logging.INFO, logger=LEARNED_LOG):
        only = load_segmenter(copied, device="cpu")
    assert only is not None and only.names == ["clothes"]
    assert any("loaded segmenters clothes from" in r.getMessage() for r in caplog.records)

    shutil.rmtree(copied / "segmentation")
    caplog.clear()
    assert check_segmenter_dirs(copied) == {}
    with caplog.at_level(logging.INFO, logger=LEARNED_LOG):
        assert load_segmenter(copied) is None
    assert any("segmentation is classical" in r.getMessage() for r in caplog.records)


# --- the worker's start check and up's


def test_the_gpu_start_check_covers_the_segmenters(copied: Path) -> None:
    assert gpu.check_models(copied) == copied
    (copied / "segmentation" / "foreground" / "config.json").unlink()
    with pytest.raises(ModelDirError, match=r"missing segmentation/foreground/config\.json"):
        gpu.check_models(copied)


def test_a_gpu_worker_with_a_half_present_segmenter_refuses_to_start(copied: Path) -> None:
    """The sibling of test_ghost_jobs' test of a worker without its model."""
    (copied / "segmentation" / "clothes" / "model.safetensors").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "hiddenmodel.cli", "worker", "--queues", "gpu"],
        env={**os.environ, "HM_MODEL_DIR": str(copied)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "missing segmentation/clothes/model.safetensors (weights)" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_refuses_a_half_present_segmenter(
    copied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hiddenmodel.up import UpError
    from hiddenmodel.up.model import MODEL_ENV, plan_model

    (copied / "segmentation" / "clothes" / "preprocessor_config.json").unlink()
    monkeypatch.setenv(MODEL_ENV, str(copied))
    with pytest.raises(UpError, match=r"missing segmentation/clothes/preprocessor_config"):
        plan_model(tmp_path)


# --- segment() and the job


class GroundTruth:
    """A deterministic segmenter: the scene's own masks as probabilities."""

    names = ["clothes"]

    def __init__(self, scene: Scene, *, with_body: bool = True) -> None:
        self.scene = scene
        self.with_body = with_body
        self.calls = 0

    def predict(self, rgb: RGBArray) -> SegmenterOutput:
        self.calls += 1
        assert rgb.shape == self.scene.image.shape
        body = self.scene.body.astype(np.float32) if self.with_body else None
        return SegmenterOutput(garment=self.scene.garment.astype(np.float32), body=body)


@pytest.mark.parametrize("with_body", [True, False])
def test_a_segmenter_drives_segment(tee: Scene, with_body: bool) -> None:
    seg = segment(tee.image, segmenter=GroundTruth(tee, with_body=with_body))
    assert seg.source == "model"
    assert iou(seg.garment, tee.garment) > 0.999
    if with_body:
        assert iou(seg.body, tee.body) > 0.999
    else:
        # Body is the classical foreground outside the garment.
        assert iou(seg.body, tee.body) > 0.9


def test_the_tiny_segmenters_run_through_segment(segmenter: CombinedSegmenter, tee: Scene) -> None:
    seg = segment(tee.image, segmenter=segmenter)
    assert seg.source == "model"
    assert seg.garment.shape == seg.body.shape == tee.image.shape[:2]
    assert not (seg.garment & seg.body).any()


def test_make_tiny_model_takes_the_segmenters_option() -> None:
    from hiddenmodel.cli import build_parser

    assert build_parser().parse_args(["make-tiny-model", "d", "--segmenters"]).segmenters
    assert not build_parser().parse_args(["make-tiny-model", "d"]).segmenters


def test_foreground_box_spans_the_subject_not_specks(tee: Scene) -> None:
    ys, xs = np.nonzero(~tee.backdrop)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    box = foreground_box(tee.image)
    assert box is not None
    bx0, by0, bx1, by1 = box
    margin = round(0.02 * max(tee.image.shape[:2]))
    assert x0 - margin - 3 <= bx0 <= x0 and y0 - margin - 3 <= by0 <= y0
    assert x1 <= bx1 <= x1 + margin + 3 and y1 <= by1 <= y1 + margin + 3
    specked = tee.image.copy()
    specked[60:64, 8:12] = 20  # a small dark speck near the left edge, away from the subject
    assert foreground_box(specked) == box
    assert foreground_box(np.full((80, 60, 3), 235, np.uint8)) is None


def test_the_job_passes_the_segmenter_and_reports_it(
    tee: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.executors import EXECUTORS, Execution

    fake = GroundTruth(tee)
    from workers.batching import InpaintBatcher

    # The process's batcher, over the test inpainter instead of the resident model.
    monkeypatch.setattr(gpu, "inpainter", lambda: InpaintBatcher(DiffusionTestInpainter()))
    monkeypatch.setattr(gpu, "segmenter", lambda: fake)
    params: dict[str, Any] = {"size": 480, "steps": 4, "seed": 3}
    stages: list[str] = []

    def run(images: dict[str, Image.Image]) -> dict[str, Any]:
        ex = Execution(params, images, lambda stage, _: stages.append(stage))
        return EXECUTORS["ghost_mannequin"](ex).report

    report = run({"image": tee.pil()})
    assert fake.calls == 1
    assert report["segmentation"] == "model" and report["segmenters"] == ["clothes"]
    # The caller's mask takes precedence: the segmenter is not used, and not reported.
    mask = Image.fromarray((tee.garment * 255).astype(np.uint8), "L")
    report = run({"image": tee.pil(), "mask": mask})
    assert fake.calls == 1
    assert report["segmentation"] == "supplied" and report["segmenters"] == []


def test_the_worker_loads_its_segmenter_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Settings:
        def __init__(self, path: Path | None) -> None:
            self.model_dir = path

    monkeypatch.setattr(gpu, "_segmenter", None)
    monkeypatch.setattr(gpu, "_segmenter_loaded", False)
    monkeypatch.setattr(gpu, "get_settings", lambda: Settings(model_dir))
    first = gpu.segmenter()
    assert first is not None and first.names == ["clothes", "foreground"]
    assert gpu.segmenter() is first

    monkeypatch.setattr(gpu, "_segmenter_loaded", False)
    monkeypatch.setattr(gpu, "get_settings", lambda: Settings(None))
    assert gpu.segmenter() is None
