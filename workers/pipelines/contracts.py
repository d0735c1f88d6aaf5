"""The seams between image operations and the model runtime.

Pipelines are written against :class:`Inpainter`; the model runtime (``workers.models``)
implements it with SDXL inpainting. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


class JobCancelled(Exception):
    """Raised from a progress callback to stop work at the next step."""


# (step, total_steps) after each denoising step; may raise JobCancelled.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class InpaintRequest:
    image: Image.Image  # RGB; width and height multiples of 8
    mask: Image.Image  # L; 255 where content is generated, 0 where it is kept
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    strength: float
    guidance: float


@dataclass
class InpaintResult:
    image: Image.Image  # RGB, same size as the request
    gpu_seconds: float  # device time of this request (a batch's time split evenly)
    batch_size: int = 1  # how many requests shared the pipeline call


class Inpainter(Protocol):
    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult: ...

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]: ...
