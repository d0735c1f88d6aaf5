"""Learned segmenters loaded from local weights, behind :class:`Segmenter`.

Two optional models live in subfolders of the SDXL checkpoint folder (``HM_MODEL_DIR``):

- ``segmentation/clothes/`` — a human/clothes parser of the SegFormer architecture (the public
  18-label "clothes" parsers and the like). Its labels, read from ``config.id2label``, are
  grouped by name into garment, body and other; the output is each group's summed softmax
  probability.
- ``segmentation/foreground/`` — SAM, prompted with the box around the foreground that the
  classical backdrop fit finds. Its mask is the whole foreground (garment and mannequin), so on
  its own it only separates the subject from the backdrop: it is meant for mannequin shots and
  is combined with the parser by :class:`CombinedSegmenter`.

Each folder holds ``config.json``, the weights and the (pre)processor config, as written by
``save_pretrained``. Either, both or neither may be present; with neither, segmentation stays
classical. torch and transformers are imported only when a model is loaded, so
:func:`check_segmenter_dirs` needs neither.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

from workers.models.runtime import ModelDirError
from workers.pipelines.ghost.segmentation import (
    FloatImage,
    RGBArray,
    SegmenterOutput,
    as_rgb_array,
    fit_backdrop,
    rgb_to_lab,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LabelGroup = Literal["garment", "body", "other"]
SegmenterName = Literal["clothes", "foreground"]

SEGMENTATION_DIR = "segmentation"
CLOTHES: SegmenterName = "clothes"
FOREGROUND: SegmenterName = "foreground"
SEGMENTER_NAMES: tuple[SegmenterName, ...] = (CLOTHES, FOREGROUND)

_CONFIG = "config.json"
_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# Older checkpoints ship the image processor's file; transformers 5 writes the processor's.
_PREPROCESSORS = ("preprocessor_config.json", "processor_config.json")

# Label names after normalisation (lower case, without '-', '_' and spaces), as used by the
# public human parsers (ATR, LIP, CIHP label sets).
GARMENT_LABELS = frozenset(
    {
        "upperclothes",
        "lowerclothes",
        "skirt",
        "pants",
        "trousers",
        "shorts",
        "dress",
        "belt",
        "scarf",
        "coat",
        "jacket",
        "jumpsuit",
        "jumpsuits",
    }
)
BODY_LABELS = frozenset(
    {
        "hair",
        "face",
        "neck",
        "skin",
        "torsoskin",
        "leftarm",
        "rightarm",
        "leftleg",
        "rightleg",
        "arm",
        "arms",
        "leg",
        "legs",
    }
)
OTHER_LABELS = frozenset(
    {
        "background",
        "hat",
        "sunglasses",
        "glasses",
        "glove",
        "gloves",
        "socks",
        "leftshoe",
        "rightshoe",
        "shoe",
        "shoes",
        "bag",
    }
)
GROUPS: tuple[LabelGroup, ...] = ("garment", "body", "other")

# The foreground box: the largest components holding this share of the foreground pixels,
# widened by this share of the image's longer side (at least 2 pixels).
BOX_COVERAGE = 0.9
BOX_MARGIN = 0.02


def normalise_label(name: str) -> str:
    """A label name compared case-insensitively and without '-', '_' or spaces."""
    return "".join(c for c in name.lower() if c not in "-_ ")


def label_groups(
    id2label: Mapping[int, str] | Mapping[str, str], *, log_unknown: bool = True
) -> dict[int, LabelGroup]:
    """Map each label id to garment, body or other by its name.

    Unknown names count as other (logged in one warning unless ``log_unknown`` is false).
    Raises ``ValueError`` naming the labels found when none of them is a garment.
    """
    groups: dict[int, LabelGroup] = {}
    unknown: list[str] = []
    for key, name in id2label.items():
        label = normalise_label(str(name))
        if label in GARMENT_LABELS:
            groups[int(key)] = "garment"
        elif label in BODY_LABELS:
            groups[int(key)] = "body"
        else:
            groups[int(key)] = "other"
            if label not in OTHER_LABELS:
                unknown.append(str(name))
    if "garment" not in groups.values():
        found = ", ".join(str(name) for name in id2label.values()) or "none"
        raise ValueError(f"no garment label among the model's labels ({found})")
    if unknown and log_unknown:
        log.warning("clothes parser labels not recognised, treated as other: %s", unknown)
    return groups


# --- folder layout ---------------------------------------------------------------------------


def _folder_problems(root: Path, name: SegmenterName) -> list[str]:
    folder = root / SEGMENTATION_DIR / name
    where = f"{SEGMENTATION_DIR}/{name}"
    if not folder.is_dir():
        return [f"{where} is not a directory"]
    problems: list[str] = []
    if not (folder / _CONFIG).is_file():
        problems.append(f"missing {where}/{_CONFIG}")
    present = [f for f in _WEIGHTS if (folder / f).is_file()]
    if not present:
        problems.append(f"missing {where}/{_WEIGHTS[0]} (weights)")
    for index in (f for f in present if f.endswith(".index.json")):
        problems.extend(_missing_shards(folder, where, index))
    if not any((folder / f).is_file() for f in _PREPROCESSORS):
        problems.append(f"missing {where}/{_PREPROCESSORS[0]}")
    if name == CLOTHES and (folder / _CONFIG).is_file():
        problems.extend(_label_problems(folder, where))
    return problems


def _missing_shards(folder: Path, where: str, index: str) -> list[str]:
    try:
        weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return [f"{where}/{index} is unreadable ({exc})"]
    return [f"missing {where}/{s} (weight shard)" for s in shards if not (folder / s).is_file()]


def _label_problems(folder: Path, where: str) -> list[str]:
    try:
        config = json.loads((folder / _CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{where}/{_CONFIG} is unreadable ({exc})"]
    id2label = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(id2label, dict):
        id2label = {}
    try:
        label_groups(id2label, log_unknown=False)
    except ValueError as exc:
        return [f"{where}/{_CONFIG}: {exc}"]
    return []


def check_segmenter_dirs(model_dir: Path | str) -> dict[str, Path]:
    """The segmenter folders present under ``model_dir``, by name (``clothes``, ``foreground``).

    An absent folder means that segmenter is not configured. A folder that exists but lacks
    its config, weights or (pre)processor config, or a clothes parser without a garment label,
    raises :class:`~workers.models.runtime.ModelDirError` naming every problem. Reads no
    weights and needs no torch.
    """
    root = Path(model_dir)
    found: dict[str, Path] = {}
    problems: list[str] = []
    for name in SEGMENTER_NAMES:
        folder = root / SEGMENTATION_DIR / name
        if not folder.exists():
            continue
        folder_problems = _folder_problems(root, name)
        if folder_problems:
            problems.extend(folder_problems)
        else:
            found[name] = folder
    if problems:
        raise ModelDirError(root, problems)
    return found


# --- models ----------------------------------------------------------------------------------


def _prepare_offline() -> None:
    # Set before transformers and huggingface_hub are imported, which read it once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA when available, else CPU; float32 unless told otherwise (the segmenters are small
    next to SDXL and run once per image)."""
    import torch

    chosen = torch.device(device) if device is not None else None
    if chosen is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return chosen, dtype if dtype is not None else torch.float32


class ClothesParser:
    """A SegFormer human/clothes parser: garment and body probabilities per pixel."""

    name: SegmenterName = CLOTHES

    def __init__(
        self,
        model: Any,
        processor: Any,
        groups: Mapping[int, LabelGroup],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        import torch

        self.model = model
        self.processor = processor
        self.groups = dict(groups)
        self.device = device
        self.dtype = dtype
        n_labels = int(model.config.num_labels)
        # (3, labels): row g sums the probabilities of group g's labels.
        weights = torch.zeros((len(GROUPS), n_labels), dtype=torch.float32)
        for label, group in self.groups.items():
            if 0 <= label < n_labels:
                weights[GROUPS.index(group), label] = 1.0
        self._group_weights = weights.to(device)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        folder: Path | str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ClothesParser:
        """Load a parser from ``folder`` (local files only).

        Raises :class:`~workers.models.runtime.ModelDirError` when its labels include no
        garment label.
        """
        _prepare_offline()
        from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

        path = Path(folder)
        chosen_device, chosen_dtype = _device_dtype(device, dtype)
        model = SegformerForSemanticSegmentation.from_pretrained(
            path, dtype=chosen_dtype, local_files_only=True
        )
        try:
            groups = label_groups(model.config.id2label)
        except ValueError as exc:
            raise ModelDirError(path, [f"{_CONFIG}: {exc}"]) from exc
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model.to(chosen_device).eval()
        return cls(model, processor, groups, chosen_device, chosen_dtype)

    def group_probabilities(self, rgb: RGBArray) -> FloatImage:
        """(3, H, W) probabilities of garment, body and other at the input's size."""
        import torch

        arr = as_rgb_array(rgb)
        h, w = arr.shape[:2]
        inputs = self.processor(images=arr, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with self._lock, torch.inference_mode():
            logits = self.model(pixel_values=pixels).logits.float()
            probs = logits.softmax(dim=1)
            grouped = torch.einsum("gl,blhw->bghw", self._group_weights, probs)
            up = torch.nn.functional.interpolate(
                grouped, size=(h, w), mode="bilinear", align_corners=False
            )
        grouped_np = np.asarray(up[0].cpu().numpy(), dtype=np.float32)
        return np.clip(grouped_np, 0.0, 1.0).astype(np.float32)

    def predict(self, rgb: RGBArray) -> SegmenterOutput:
        """Garment and body probabilities (hair, face, arms, legs) at the input's size."""
        probs = self.group_probabilities(rgb)
        return SegmenterOutput(garment=probs[0], body=probs[1])


def foreground_box(rgb: RGBArray) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1, inclusive) around what stands out from the fitted backdrop.

    Foreground is ΔE from the backdrop fit above its threshold. The box spans the largest
    components that together hold most of it (specks of noise fall outside), widened by a small
    margin. ``None`` when nothing stands out.
    """
    arr = as_rgb_array(rgb)
    h, w = arr.shape[:2]
    fit = fit_backdrop(arr)
    delta = np.linalg.norm(rgb_to_lab(arr) - fit.lab, axis=2)
    fg = (delta > fit.threshold).astype(np.uint8)
    fg = np.asarray(cv2.medianBlur(fg, 3))
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    stats = np.asarray(stats)[1:]
    if n <= 1:
        return None
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    order = np.argsort(-areas, kind="stable")
    needed = BOX_COVERAGE * float(areas.sum())
    taken = order[: int(np.searchsorted(np.cumsum(areas[order]), needed)) + 1]
    x0 = int(stats[taken, cv2.CC_STAT_LEFT].min())
    y0 = int(stats[taken, cv2.CC_STAT_TOP].min())
    x1 = int((stats[taken, cv2.CC_STAT_LEFT] + stats[taken, cv2.CC_STAT_WIDTH]).max()) - 1
    y1 = int((stats[taken, cv2.CC_STAT_TOP] + stats[taken, cv2.CC_STAT_HEIGHT]).max()) - 1
    margin = max(2, round(BOX_MARGIN * max(h, w)))
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(w - 1, x1 + margin),
        min(h - 1, y1 + margin),
    )


class PromptedForeground:
    """SAM prompted with the classical foreground's box: the subject's probability per pixel.

    The subject is garment and mannequin together, so :meth:`predict` returns it as
    ``garment`` with ``body=None``; the classical pass then counts the rest of its own
    foreground as body. Meant for mannequin shots, and best combined with a
    :class:`ClothesParser` (:class:`CombinedSegmenter`).
    """

    name: SegmenterName = FOREGROUND

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        folder: Path | str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> PromptedForeground:
        """Load SAM and its processor from ``folder`` (local files only)."""
        _prepare_offline()
        from transformers import SamModel, SamProcessor

        path = Path(folder)
        chosen_device, chosen_dtype = _device_dtype(device, dtype)
        model = SamModel.from_pretrained(path, dtype=chosen_dtype, local_files_only=True)
        processor = SamProcessor.from_pretrained(path, local_files_only=True)
        model.to(chosen_device).eval()
        return cls(model, processor, chosen_device, chosen_dtype)

    def probability(self, rgb: RGBArray, box: Sequence[int] | None = None) -> FloatImage:
        """(H, W) foreground probability inside ``box`` (default: :func:`foreground_box`, or
        the whole image when nothing stands out from the backdrop).

        Of SAM's candidate masks, the one with the highest predicted IoU is taken.
        """
        import torch

        arr = as_rgb_array(rgb)
        h, w = arr.shape[:2]
        if box is None:
            box = foreground_box(arr) or (0, 0, w - 1, h - 1)
        inputs = self.processor(
            images=arr, input_boxes=[[[float(v) for v in box]]], return_tensors="pt"
        )
        with self._lock, torch.inference_mode():
            out = self.model(
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                multimask_output=True,
            )
            best = int(out.iou_scores[0, 0].float().argmax())
            low_res = out.pred_masks[:, :, best : best + 1].float().cpu()
        logits = self.processor.image_processor.post_process_masks(
            low_res,
            inputs["original_sizes"],
            inputs["reshaped_input_sizes"],
            binarize=False,
        )[0]
        prob = torch.sigmoid(logits[0, 0].float()).numpy()
        return np.asarray(prob, dtype=np.float32)

    def predict(self, rgb: RGBArray) -> SegmenterOutput:
        """The subject (garment and mannequin) as ``garment``; ``body`` is left to the
        classical pass."""
        return SegmenterOutput(garment=self.probability(rgb), body=None)


class CombinedSegmenter:
    """A clothes parser and/or a prompted foreground model as one :class:`Segmenter`.

    - parser only: its garment and body;
    - foreground only: the subject as garment, body left to the classical pass;
    - both: garment is the parser's garment within the subject (a fuzzy AND, the minimum),
      and body is the parser's body together with the rest of the subject (a mannequin, which
      a human parser does not label).
    """

    def __init__(
        self, parser: ClothesParser | None = None, foreground: PromptedForeground | None = None
    ) -> None:
        if parser is None and foreground is None:
            raise ValueError("a combined segmenter needs a parser, a foreground model or both")
        self.parser = parser
        self.foreground = foreground

    @property
    def names(self) -> list[str]:
        """The segmenters in use, for job reports: ``clothes``, ``foreground``."""
        return [m.name for m in (self.parser, self.foreground) if m is not None]

    def predict(self, rgb: RGBArray) -> SegmenterOutput:
        """Garment (and, with a parser, body) probabilities at the input's size."""
        arr = as_rgb_array(rgb)
        parsed = self.parser.predict(arr) if self.parser is not None else None
        subject = self.foreground.probability(arr) if self.foreground is not None else None
        if parsed is None:
            assert subject is not None
            return SegmenterOutput(garment=subject, body=None)
        if subject is None:
            return parsed
        garment = np.minimum(parsed.garment, subject)
        body = np.minimum(subject, 1.0 - garment)
        if parsed.body is not None:
            body = np.maximum(body, parsed.body)
        return SegmenterOutput(garment=garment.astype(np.float32), body=body.astype(np.float32))


def load_segmenter(
    model_dir: Path | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> CombinedSegmenter | None:
    """Load the segmenters present under ``model_dir``; ``None`` when there is none.

    Checks the folders first (:func:`check_segmenter_dirs`), then logs which segmenters were
    loaded, or that segmentation stays classical.
    """
    root = Path(model_dir)
    present = check_segmenter_dirs(root)
    if not present:
        log.info(
            "no learned segmenter in %s: segmentation is classical",
            root / SEGMENTATION_DIR,
        )
        return None
    began = time.perf_counter()
    parser = ClothesParser.load(present[CLOTHES], device, dtype) if CLOTHES in present else None
    foreground = (
        PromptedForeground.load(present[FOREGROUND], device, dtype)
        if FOREGROUND in present
        else None
    )
    combined = CombinedSegmenter(parser, foreground)
    loaded = parser or foreground
    assert loaded is not None
    log.info(
        "loaded segmenters %s from %s on %s as %s in %.1f s",
        ", ".join(combined.names),
        root / SEGMENTATION_DIR,
        loaded.device,
        loaded.dtype,
        time.perf_counter() - began,
    )
    return combined
