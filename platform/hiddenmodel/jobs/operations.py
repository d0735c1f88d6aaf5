"""The registry of operations: name, version, params schema, queue and cost estimate.

The API validates against it at submit; workers look up the implementation by name. It
imports no image or model code, so the API stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hiddenmodel.errors import Problem

OutputFormat = Literal["png", "jpeg", "webp"]
PngCompression = Annotated[
    Literal["fast", "small"],
    Field(
        description="PNG output only, lossless either way: `fast` encodes in about a "
        "twentieth of the CPU, `small` gives files about 13 % smaller on photographs"
    ),
]


class RemoveBackgroundParams(BaseModel):
    """Remove a studio backdrop: estimated from the borders, soft alpha matte."""

    model_config = ConfigDict(extra="forbid")

    background: Literal["white", "transparent"] = "white"
    format: OutputFormat = "png"
    quality: int = Field(default=90, ge=1, le=100)
    png_compression: PngCompression = "fast"
    feather_px: float = Field(default=1.5, ge=0, le=20)

    @model_validator(mode="after")
    def _jpeg_has_no_alpha(self) -> RemoveBackgroundParams:
        if self.background == "transparent" and self.format == "jpeg":
            raise ValueError("a transparent background needs png or webp output")
        return self


class ResizeParams(BaseModel):
    """Resize to a box: fit inside it, fill it (crop), or stretch to it exactly."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(default=None, ge=1, le=6000)
    height: int | None = Field(default=None, ge=1, le=6000)
    mode: Literal["fit", "fill", "exact"] = "fit"
    format: OutputFormat = "png"
    quality: int = Field(default=90, ge=1, le=100)
    png_compression: PngCompression = "fast"
    background: str | None = Field(
        default=None, pattern=r"^#[0-9a-fA-F]{6}$", description="Pad colour for `fit`."
    )

    @model_validator(mode="after")
    def _box(self) -> ResizeParams:
        if self.width is None and self.height is None:
            raise ValueError("give width, height or both")
        if self.mode != "fit" and (self.width is None or self.height is None):
            raise ValueError(f"mode '{self.mode}' needs both width and height")
        return self


class GhostMannequinParams(BaseModel):
    """Body removed, hidden inner parts reconstructed, garment on a clean background."""

    model_config = ConfigDict(extra="forbid")

    background: Literal["white", "transparent"] = "white"
    format: OutputFormat = "png"
    quality: int = Field(default=90, ge=1, le=100)
    png_compression: PngCompression = "fast"
    size: int = Field(default=1024, ge=256, le=2048, description="Long side of the output")
    steps: int = Field(default=30, ge=1, le=100)
    strength: float = Field(default=0.99, gt=0, le=1)
    guidance: float = Field(default=7.0, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Random if unset")
    shadow: bool = False
    garment_type: Literal["top", "sleeveless", "hoodie", "dress", "skirt", "trousers"] | None = (
        Field(
            default=None,
            description="What the garment is; used for its openings and in the prompt. "
            "Inferred from the silhouette when unset",
        )
    )
    debug_layers: bool = Field(default=False, description="Also return each mask as a layer")

    @model_validator(mode="after")
    def _jpeg_has_no_alpha(self) -> GhostMannequinParams:
        if self.background == "transparent" and self.format == "jpeg":
            raise ValueError("a transparent background needs png or webp output")
        return self


# Measured: 1.92 GPU-s per 1024² image at 30 steps, batch 1, eager (DESIGN §6); the
# inpainted crop is usually well under the full frame, so this errs on the high side.
GPU_SECONDS_PER_STEP_1024 = 0.064
GPU_OVERHEAD_SECONDS = 0.1


def _ghost_estimate(params: BaseModel, width: int, height: int) -> CostEstimate:
    assert isinstance(params, GhostMannequinParams)
    steps = max(1, int(params.steps * params.strength))
    scale = (params.size / 1024) ** 2
    return CostEstimate(
        gpu_seconds=round(GPU_OVERHEAD_SECONDS + GPU_SECONDS_PER_STEP_1024 * steps * scale, 3)
    )


@dataclass(frozen=True)
class CostEstimate:
    gpu_seconds: float
    images: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_seconds": round(self.gpu_seconds, 3), "images": self.images}


Estimator = Callable[[BaseModel, int, int], CostEstimate]


def _no_gpu(params: BaseModel, width: int, height: int) -> CostEstimate:
    return CostEstimate(gpu_seconds=0.0)


@dataclass(frozen=True)
class Operation:
    name: str
    version: str
    summary: str
    params_model: type[BaseModel]
    queue: Literal["cpu", "gpu"]
    estimate: Estimator = _no_gpu
    # Named image inputs besides ``image`` that the operation accepts.
    extra_inputs: tuple[str, ...] = ()
    # Params that make a valid example (documentation and the cost shown per operation).
    example: dict[str, Any] = field(default_factory=dict)
    # The shortest side, in pixels, of an ``image`` the operation can work on: checked at
    # submit, so a photo it cannot use is refused before anything is stored or charged.
    min_input_side: int = 8

    def check_input_size(self, width: int, height: int) -> str | None:
        """Why an image of this size cannot be used, or None."""
        if min(width, height) < self.min_input_side:
            return (
                f"Operation '{self.name}' needs an image of at least {self.min_input_side} px "
                f"on each side; this one is {width}x{height}."
            )
        return None

    def validate_params(self, raw: dict[str, Any]) -> BaseModel:
        try:
            return self.params_model.model_validate(raw)
        except ValidationError as exc:
            raise Problem(
                f"Invalid params for operation '{self.name}'.",
                status=422,
                kind="invalid-params",
                title="Invalid params",
                errors=[
                    {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_context=False)
                ],
            ) from exc

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "summary": self.summary,
            "queue": self.queue,
            "inputs": ["image", *self.extra_inputs],
            "min_input_side": self.min_input_side,
            "params_schema": self.params_model.model_json_schema(),
            "example_params": self.example,
            "cost_estimate_1024px": self.estimate(
                self.params_model.model_validate(self.example), 1024, 1024
            ).as_dict(),
        }


_REGISTRY: dict[str, Operation] = {}


def register(operation: Operation) -> Operation:
    _REGISTRY[operation.name] = operation
    return operation


def get_operation(name: str) -> Operation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise Problem(
            f"Unknown operation '{name}'.",
            status=422,
            kind="unknown-operation",
            title="Unknown operation",
            known=sorted(_REGISTRY),
        ) from None


def all_operations() -> list[Operation]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


register(
    Operation(
        name="remove_background",
        version="1.0",
        summary="Remove a studio backdrop; composite on white or leave transparent.",
        params_model=RemoveBackgroundParams,
        queue="cpu",
        extra_inputs=("mask",),
    )
)
register(
    Operation(
        name="resize",
        version="1.0",
        summary="Resize to fit, fill or exactly match a box; PNG, JPEG or WEBP output.",
        params_model=ResizeParams,
        queue="cpu",
        example={"width": 512, "height": 512, "mode": "fit"},
    )
)
register(
    Operation(
        name="ghost_mannequin",
        version="1.0",
        summary=(
            "Remove the mannequin or model, reconstruct the hidden inside of the garment "
            "(neck, collar back, sleeve and hem openings) with SDXL inpainting, and composite "
            "on white or transparent. Optional inputs: `mask` (garment), `body_mask`, and "
            "`interior` (the garment's inside shot, composited where it aligns)."
        ),
        params_model=GhostMannequinParams,
        queue="gpu",
        estimate=_ghost_estimate,
        extra_inputs=("mask", "body_mask", "interior"),
        example={"background": "white", "size": 1024, "steps": 30, "seed": 7},
        # Below this the garment is a handful of pixels: nothing to segment or reconstruct.
        min_input_side=32,
    )
)
