"""Operation implementations, looked up by the registry's names.

Each executor turns decoded inputs and validated params into output images and a report.
GPU operations are added where the model runtime lives; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from hiddenmodel.jobs.operations import RemoveBackgroundParams, ResizeParams
from workers.pipelines.background import remove_background
from workers.pipelines.resize import resize

ImageFormat = Literal["png", "jpeg", "webp"]
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


Executor = Callable[[Execution], ExecutionResult]


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
            OutputImage("output", out, params.format, params.quality),
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
            ex.images["image"],
            width=params.width,
            height=params.height,
            mode=params.mode,
            background=_hex_rgb(params.background),
        )
    except ValueError as exc:
        raise OperationFailed("resize-not-possible", str(exc)) from exc
    ex.progress("encoding", 0.9)
    return ExecutionResult(outputs=[OutputImage("output", out, params.format, params.quality)])


EXECUTORS: dict[str, Executor] = {
    "remove_background": _remove_background,
    "resize": _resize,
}


def register_executor(name: str, executor: Executor) -> None:
    EXECUTORS[name] = executor
