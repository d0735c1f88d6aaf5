"""Operation executors, looked up by the registry's names (``EXECUTORS``).

Each executor turns decoded inputs and validated params into output images and a report.
GPU operations are added where the model runtime lives; nothing here imports torch.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from hiddenmodel.images import ImageFormat, PlainPng, PngCompression
from hiddenmodel.jobs.operations import (
    GhostMannequinParams,
    RemoveBackgroundParams,
    ResizeParams,
)
from workers.pipelines.background import remove_background
from workers.pipelines.contracts import (
    Inpainter,
    InpaintRequest,
    InpaintResult,
    JobCancelled,
    ProgressCallback,
)
from workers.pipelines.resize import resize

# (stage, fraction 0..1); raises JobCancelled when the job was canceled.
Progress = Callable[[str, float], None]


class OperationFailed(Exception):
    """The input cannot be processed by this operation (not our fault, not retried)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class OutputImage:
    name: str
    image: Image.Image
    format: ImageFormat
    quality: int = 90
    png_compression: PngCompression = "fast"


@dataclass
class ExecutionResult:
    outputs: list[OutputImage]
    report: dict[str, Any] = field(default_factory=dict)
    gpu_seconds: float = 0.0


@dataclass
class GpuMeter:
    """Device time used so far; what a job canceled mid-run is billed."""

    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += seconds


@dataclass
class Execution:
    params: dict[str, Any]
    images: dict[str, Image.Image]
    progress: Progress
    meter: GpuMeter = field(default_factory=GpuMeter)
    # Inputs left undecoded, for an operation of TAKES_PLAIN_PNG: each is in this or in
    # ``images``, never both.
    plain_pngs: dict[str, PlainPng] = field(default_factory=dict)


Executor = Callable[[Execution], ExecutionResult]


class MeteredInpainter:
    """Counts each request's device time into the job's meter; a request canceled midway
    is counted by wall time while it held the GPU."""

    def __init__(self, inner: Inpainter, meter: GpuMeter) -> None:
        self.inner = inner
        self.meter = meter
        self.batch_sizes: list[int] = []

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        started = time.perf_counter()
        try:
            result = self.inner.inpaint(request, progress)
        except JobCancelled:
            self.meter.add(time.perf_counter() - started)
            raise
        self.meter.add(result.gpu_seconds)
        self.batch_sizes.append(result.batch_size)
        return result

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]:
        return [self.inpaint(r, progress) for r in requests]


def _remove_background(ex: Execution) -> ExecutionResult:
    params = RemoveBackgroundParams.model_validate(ex.params)
    image = ex.images["image"]
    ex.progress("matting", 0.1)
    mask = ex.images.get("mask")
    if mask is not None:
        # The caller's mask is the matte: composite with it, estimate nothing.
        alpha = mask.convert("L")
        rgba = image.convert("RGBA")
        rgba.putalpha(alpha)
        if params.background == "white":
            out = Image.new("RGB", image.size, (255, 255, 255))
            out.paste(rgba, mask=alpha)
        else:
            out = rgba
        report: dict[str, Any] = {"matte": "caller_mask"}
    else:
        result = remove_background(
            image, background=params.background, feather_px=params.feather_px
        )
        out, alpha, report = result.image, result.alpha, dict(result.report)
    ex.progress("encoding", 0.9)
    return ExecutionResult(
        outputs=[
            OutputImage("output", out, params.format, params.quality, params.png_compression),
            OutputImage("alpha", alpha, "png"),
        ],
        report=report,
    )


def _hex_rgb(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))


def _resize(ex: Execution) -> ExecutionResult:
    params = ResizeParams.model_validate(ex.params)
    ex.progress("resizing", 0.1)
    try:
        out = resize(
            ex.plain_pngs.get("image") or ex.images["image"],
            width=params.width,
            height=params.height,
            mode=params.mode,
            background=_hex_rgb(params.background),
        )
    except ValueError as exc:
        raise OperationFailed("resize-not-possible", str(exc)) from exc
    ex.progress("encoding", 0.9)
    return ExecutionResult(
        outputs=[OutputImage("output", out, params.format, params.quality, params.png_compression)]
    )


def _mask_array(image: Image.Image | None) -> Any:
    if image is None:
        return None
    import numpy as np

    return np.asarray(image.convert("L")) >= 128


def _ghost_mannequin(ex: Execution) -> ExecutionResult:
    # Imported here: only GPU workers load OpenCV and the model runtime.
    from workers import gpu
    from workers.pipelines.ghost.pipeline import GhostParams, NotAGhostPhoto, ghost_mannequin

    params = GhostMannequinParams.model_validate(ex.params)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
    batcher = gpu.inpainter()
    metered = MeteredInpainter(batcher, ex.meter)
    segmenter = gpu.segmenter()

    def on_step(step: int, total: int) -> None:
        ex.progress("inpainting", 0.1 + 0.8 * step / max(1, total))

    ex.progress("segmenting", 0.05)
    # Announced to the batcher: a batch waits for this job only while it may still ask.
    with batcher.job():
        try:
            result = ghost_mannequin(
                ex.images["image"],
                inpainter=metered,
                params=GhostParams(
                    background=params.background,
                    size=params.size,
                    steps=params.steps,
                    strength=params.strength,
                    guidance=params.guidance,
                    seed=seed,
                    shadow=params.shadow,
                    garment_type=params.garment_type,
                    debug_layers=params.debug_layers,
                ),
                garment_mask=_mask_array(ex.images.get("mask")),
                body_mask=_mask_array(ex.images.get("body_mask")),
                interior=ex.images.get("interior"),
                progress=on_step,
                segmenter=segmenter,
            )
        except NotAGhostPhoto as exc:
            raise OperationFailed(exc.code, str(exc)) from exc
        except ValueError as exc:
            raise OperationFailed("ghost-not-possible", str(exc)) from exc
    ex.progress("compositing", 0.92)
    outputs = [
        OutputImage("output", result.image, params.format, params.quality, params.png_compression),
        OutputImage("alpha", result.alpha, "png"),
    ]
    outputs += [
        OutputImage(f"debug-{name.replace('_', '-')}", layer, "png")
        for name, layer in sorted(result.layers.items())
    ]
    report = {
        **{k: v for k, v in result.report.items() if _jsonable(v)},
        "seed": seed,
        "batch_sizes": metered.batch_sizes,
        # The learned segmenters that split this image ([] when the segmentation was
        # classical or the caller's masks).
        "segmenters": segmenter.names
        if segmenter is not None and result.report.get("segmentation") == "model"
        else [],
    }
    return ExecutionResult(outputs=outputs, report=report, gpu_seconds=result.gpu_seconds)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


EXECUTORS: dict[str, Executor] = {
    "remove_background": _remove_background,
    "resize": _resize,
    "ghost_mannequin": _ghost_mannequin,
}
# Operations whose executor takes a plain PNG input undecoded (Execution.plain_pngs, see
# hiddenmodel.images.decode_image_or_plain_png): a resize reads it with libvips as it
# reduces it.
TAKES_PLAIN_PNG: frozenset[str] = frozenset({"resize"})


def register_executor(name: str, executor: Executor) -> None:
    EXECUTORS[name] = executor
