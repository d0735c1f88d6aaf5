"""The SDXL inpainting runtime: one resident pipeline per worker process.

The model loads once per worker process, after the fork (:func:`get_runtime`), from a local
diffusers-format directory with the hub offline, and stays resident. Pipelines of other
classes built from the same loaded modules (:meth:`ModelRuntime.sibling`) share its weights.
Each request gets a fresh scheduler instance and its own seeded generator, so requests do not
influence each other.

**One job at a time per process.** The pipeline object carries per-call state (its scheduler,
the interrupt flag, the VAE's temporary upcast), so concurrent calls would corrupt each other.
Calls are serialised by a lock; run one model job per worker process (Celery ``--pool=solo``
or prefork with concurrency matching the devices) rather than relying on that lock.

torch and diffusers are imported only when a model is loaded, so this module (and
:func:`check_model_dir`) is usable on installs without the ``ai`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from workers.pipelines.contracts import (
    InpaintRequest,
    InpaintResult,
    JobCancelled,
    ProgressCallback,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionXLInpaintPipeline

log = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]
PipelineT = TypeVar("PipelineT", bound="DiffusionPipeline")

# On an out-of-memory error the request is retried once with each side scaled by this factor.
# Written into a model folder whose weights are random (``make-tiny-model``): its inpainting
# is noise, which ``up`` must not hold against the pipeline.
RANDOM_WEIGHTS_FILE = "RANDOM_WEIGHTS"
OOM_RETRY_SCALE = 0.75

_MODEL_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_TEXT_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass(frozen=True)
class _Component:
    name: str
    config: tuple[str, ...]  # a config file the component needs
    weights: tuple[str, ...]  # any one of these weight files (or sharded indexes)
    files: tuple[tuple[str, ...], ...] = ()  # any one of these sets of files


COMPONENTS: tuple[_Component, ...] = (
    _Component("unet", ("config.json",), _MODEL_WEIGHTS),
    _Component("vae", ("config.json",), _MODEL_WEIGHTS),
    _Component("text_encoder", ("config.json",), _TEXT_WEIGHTS),
    _Component("text_encoder_2", ("config.json",), _TEXT_WEIGHTS),
    _Component("tokenizer", (), (), _TOKENIZER_FILES),
    _Component("tokenizer_2", (), (), _TOKENIZER_FILES),
    _Component("scheduler", ("scheduler_config.json",), ()),
)


class ModelError(Exception):
    """Base class of the runtime's errors."""


class ModelDirError(ModelError):
    """The model directory is missing or incomplete; ``problems`` lists each missing piece."""

    def __init__(self, path: Path | None, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        where = "no model directory configured (set HM_MODEL_DIR)" if path is None else str(path)
        super().__init__(f"model directory {where}: " + "; ".join(self.problems))


class ModelOutOfMemory(ModelError):
    """The device ran out of memory at the requested size and again at a reduced size."""


def check_model_dir(path: Path | str | None) -> Path:
    """Check that ``path`` holds a complete diffusers SDXL checkpoint; return it as a Path.

    Meant for worker start, so a broken deployment fails before it accepts a job. Raises
    :class:`ModelDirError` naming every missing piece: the directory, ``model_index.json``, a
    component subfolder, or a component's config or weight files. It reads no weights and
    needs no torch.
    """
    if path is None:
        raise ModelDirError(None, ["no path given"])
    root = Path(path)
    if not root.exists():
        raise ModelDirError(root, ["directory does not exist"])
    if not root.is_dir():
        raise ModelDirError(root, ["not a directory"])

    problems: list[str] = []
    listed: dict[str, Any] | None = None
    index = root / "model_index.json"
    if not index.is_file():
        problems.append("missing model_index.json")
    else:
        try:
            loaded = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"model_index.json is unreadable ({exc})")
        else:
            listed = loaded if isinstance(loaded, dict) else {}

    for component in COMPONENTS:
        problems.extend(_component_problems(root, component, listed))
    if problems:
        raise ModelDirError(root, problems)
    return root


def _component_problems(
    root: Path, component: _Component, listed: dict[str, Any] | None
) -> list[str]:
    name = component.name
    if listed is not None and name not in listed:
        problem = [f"model_index.json does not list {name}"]
    else:
        problem = []
    folder = root / name
    if not folder.is_dir():
        return [*problem, f"missing subfolder {name}/"]
    problem.extend(f"missing {name}/{f}" for f in component.config if not (folder / f).is_file())
    if component.weights:
        present = [f for f in component.weights if (folder / f).is_file()]
        if not present:
            problem.append(f"missing {name}/{component.weights[0]} (weights)")
        for found in present:
            if found.endswith(".index.json"):
                problem.extend(_missing_shards(folder, found))
    if component.files and not any(
        all((folder / f).is_file() for f in group) for group in component.files
    ):
        options = " or ".join(" + ".join(group) for group in component.files)
        problem.append(f"missing {name}/{options}")
    return problem


def _missing_shards(folder: Path, index_name: str) -> list[str]:
    try:
        weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return [f"{folder.name}/{index_name} is unreadable ({exc})"]
    return [
        f"missing {folder.name}/{s} (weight shard)" for s in shards if not (folder / s).is_file()
    ]


def denoising_steps(steps: int, strength: float) -> int:
    """How many denoising steps the pipeline runs for ``steps`` at ``strength``.

    This mirrors the pipeline's own arithmetic: ``int(steps * strength)`` in floating point,
    so the product rounds down (100 steps at 0.29 run 28, not 29).
    """
    return min(int(steps * strength), steps)


def batch_key(request: InpaintRequest) -> tuple[int, int, int, float, float]:
    """Requests with equal keys may go through :meth:`ModelRuntime.inpaint_batch` together."""
    width, height = request.image.size
    return (width, height, request.steps, request.strength, request.guidance)


def reduced_size(width: int, height: int, scale: float = OOM_RETRY_SCALE) -> tuple[int, int]:
    """The size an out-of-memory retry uses: each side scaled, down to a multiple of 8."""
    return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)


def _validate(request: InpaintRequest) -> InpaintRequest:
    width, height = request.image.size
    if request.mask.size != request.image.size:
        raise ValueError(f"mask size {request.mask.size} differs from image size {(width, height)}")
    if width % 8 or height % 8:
        raise ValueError(f"image size {width}x{height} is not a multiple of 8")
    if request.steps < 1:
        raise ValueError(f"steps must be at least 1, not {request.steps}")
    if not 0.0 < request.strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], not {request.strength}")
    if denoising_steps(request.steps, request.strength) < 1:
        raise ValueError(f"{request.steps} steps at strength {request.strength} run no step")
    if request.image.mode != "RGB" or request.mask.mode != "L":
        return replace(request, image=request.image.convert("RGB"), mask=request.mask.convert("L"))
    return request


def _to_float(image: Image.Image) -> FloatImage:
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def _to_image(array: FloatImage) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def _composite(request: InpaintRequest, generated: FloatImage) -> Image.Image:
    """Keep the input outside the mask, the generated pixels inside, blending soft edges.

    With a 9-channel inpainting UNet the pipeline regenerates every pixel through the VAE,
    so pixels outside the mask would otherwise come back altered.
    """
    alpha = _to_float(request.mask)[..., None]
    original = _to_float(request.image)
    return _to_image(original * (1.0 - alpha) + generated * alpha)


def _choose_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    import torch

    chosen = torch.device(device) if device is not None else None
    if chosen is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        if chosen.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return chosen, dtype


class ModelRuntime:
    """A loaded SDXL inpainting pipeline that implements the ``Inpainter`` protocol.

    Build it with :func:`load_runtime` (or get the process's one with :func:`get_runtime`).
    ``gpu_seconds`` in results is device time: CUDA events around the pipeline call on a GPU
    (the span the GPU is held, host gaps included), wall time of the call on a CPU. A batch's
    time is split evenly across its requests. Only the attempt that produced the result is
    counted: the time of a run that failed with out-of-memory is not.
    """

    def __init__(
        self,
        pipeline: StableDiffusionXLInpaintPipeline,
        device: torch.device,
        dtype: torch.dtype,
        model_dir: Path | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        self.model_dir = model_dir
        # Schedulers keep step state (step index, sigmas); each request builds a fresh one
        # from this config rather than reusing one a previous request stepped through.
        self._scheduler_config = pipeline.scheduler.config
        self._siblings: dict[type[Any], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_pipeline(
        cls,
        pipeline: StableDiffusionXLInpaintPipeline,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_dir: Path | None = None,
    ) -> ModelRuntime:
        """Wrap an in-memory pipeline, with the device and dtype choices of :func:`load_runtime`.

        The pipeline is moved and cast in place.
        """
        import torch

        chosen_device, chosen_dtype = _choose_device_dtype(device, dtype)
        # force_upcast makes the pipeline run the VAE in float32 around each encode and
        # decode; only float16 needs it (bfloat16 has float32's range).
        pipeline.vae.register_to_config(force_upcast=chosen_dtype == torch.float16)
        modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2)
        if any(m.dtype != chosen_dtype for m in modules):
            pipeline.to(dtype=chosen_dtype)
        pipeline.to(chosen_device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, chosen_device, chosen_dtype, model_dir)

    def sibling(self, pipeline_class: type[PipelineT]) -> PipelineT:
        """A pipeline of another class (img2img, text-to-image...) on the same weights.

        Built once and cached; its modules are the runtime's own objects, so no weights are
        copied. A 9-channel inpainting UNet builds into other SDXL pipelines but cannot run
        img2img or text-to-image calls.
        """
        cached = self._siblings.get(pipeline_class)
        if cached is None:
            # from_pipe casts the new pipeline to its dtype argument, float32 by default, and
            # the modules are shared: without ours it would cast the resident weights.
            cached = pipeline_class.from_pipe(self.pipeline, dtype=self.dtype)
            cached.set_progress_bar_config(disable=True)
            self._siblings[pipeline_class] = cached
        result: PipelineT = cached
        return result

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        """Inpaint one request; ``progress(step, total)`` after each step may cancel it."""
        return self.inpaint_batch([request], progress)[0]

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]:
        """Inpaint requests sharing a :func:`batch_key` in one pipeline call.

        Each request keeps its own prompt, image, mask and seed (one generator per request),
        so results match running them one by one up to floating-point noise. ``progress``
        reports the batch's steps; if it raises :class:`JobCancelled`, the batch stops after
        the current step and that exception is raised. Requests with different keys raise
        ``ValueError``: the caller groups them.
        """
        if not requests:
            return []
        checked = [_validate(r) for r in requests]
        keys = {batch_key(r) for r in checked}
        if len(keys) > 1:
            raise ValueError(f"requests differ in size, steps, strength or guidance: {keys}")
        with self._lock:
            images, seconds = self._generate(checked, progress)
        share = seconds / len(checked)
        return [InpaintResult(image=image, gpu_seconds=share) for image in images]

    def _generate(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None
    ) -> tuple[list[Image.Image], float]:
        import torch

        width, height = requests[0].image.size
        try:
            arrays, seconds = self._call(requests, width, height, progress)
            return [_composite(r, a) for r, a in zip(requests, arrays, strict=True)], seconds
        except torch.OutOfMemoryError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        # Retrying outside the except block frees the failed attempt's traceback and the
        # activations it keeps alive before the second attempt allocates.
        self._release_memory()
        small_w, small_h = reduced_size(width, height)
        log.warning(
            "out of device memory at %dx%d (%s); retrying at %dx%d",
            width,
            height,
            first,
            small_w,
            small_h,
        )
        smaller = [
            replace(
                r,
                image=r.image.resize((small_w, small_h), Image.Resampling.LANCZOS),
                mask=r.mask.resize((small_w, small_h), Image.Resampling.BILINEAR),
            )
            for r in requests
        ]
        try:
            arrays, seconds = self._call(smaller, small_w, small_h, progress)
        except torch.OutOfMemoryError as exc:
            self._release_memory()
            raise ModelOutOfMemory(
                f"out of device memory for {len(requests)} image(s) at {width}x{height} and "
                f"again at {small_w}x{small_h}; reduce the size or the batch"
            ) from exc
        images = []
        for request, array in zip(requests, arrays, strict=True):
            upscaled = _to_image(array).resize((width, height), Image.Resampling.LANCZOS)
            images.append(_composite(request, _to_float(upscaled)))
        return images, seconds

    def _release_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _call(
        self,
        requests: Sequence[InpaintRequest],
        width: int,
        height: int,
        progress: ProgressCallback | None,
    ) -> tuple[list[FloatImage], float]:
        """One pipeline call; returns float RGB arrays in [0, 1] and the device seconds."""
        import torch

        pipe = self.pipeline
        first = requests[0]
        pipe.scheduler = pipe.scheduler.__class__.from_config(self._scheduler_config)
        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        cancelled: list[JobCancelled] = []

        def on_step_end(
            p: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if progress is not None and not cancelled:
                try:
                    progress(step + 1, int(p.num_timesteps))
                except JobCancelled as exc:
                    cancelled.append(exc)
                    # The pipeline checks this flag before each step and skips the rest.
                    p._interrupt = True
            return tensors

        def run() -> Any:
            return pipe(
                prompt=[r.prompt for r in requests],
                negative_prompt=[r.negative_prompt for r in requests],
                image=[r.image for r in requests],
                mask_image=[r.mask for r in requests],
                height=height,
                width=width,
                num_inference_steps=first.steps,
                strength=first.strength,
                guidance_scale=first.guidance,
                generator=generators,
                output_type="np",
                callback_on_step_end=on_step_end,
            )

        try:
            output, seconds = self._timed(run)
        finally:
            # The flag lives on the shared pipeline: clear it whatever happened so the next
            # job starts clean.
            pipe._interrupt = False
            # An error inside the pipeline's float32 upcast window (float16 only) would leave
            # the VAE in float32, which the next call cannot feed.
            if pipe.vae.dtype != self.dtype:
                pipe.vae.to(dtype=self.dtype)
        if cancelled:
            raise cancelled[0]
        images = np.asarray(output.images, dtype=np.float32)
        return [images[i] for i in range(len(requests))], seconds

    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        import torch

        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return result, start.elapsed_time(end) / 1000.0
        began = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - began


def load_runtime(
    model_dir: Path | str | None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ModelRuntime:
    """Load the checkpoint in ``model_dir`` with the hub offline.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on GPUs that
    support it, float16 on older ones (the VAE then runs its encode and decode in float32,
    since float16 overflows there), and float32 on CPU.
    """
    root = check_model_dir(model_dir)
    # Set before diffusers and huggingface_hub are imported, which read it once.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from diffusers import StableDiffusionXLInpaintPipeline

    chosen_device, chosen_dtype = _choose_device_dtype(device, dtype)
    began = time.perf_counter()
    # dtype=, not the deprecated torch_dtype=; without it the text encoders load in their
    # config's dtype.
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
        root, dtype=chosen_dtype, local_files_only=True
    )
    runtime = ModelRuntime.from_pipeline(pipe, chosen_device, chosen_dtype, root)
    log.info(
        "loaded %s on %s as %s in %.1f s",
        root,
        chosen_device,
        chosen_dtype,
        time.perf_counter() - began,
    )
    return runtime


_runtime: ModelRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(model_dir: Path | str | None = None) -> ModelRuntime:
    """The process's runtime, loaded on first use from ``model_dir`` or ``HM_MODEL_DIR``.

    Call it in the worker process after the fork (CUDA cannot cross a fork); a forked child
    starts without the parent's runtime and loads its own.
    """
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            if model_dir is None:
                from hiddenmodel.settings import get_settings

                model_dir = get_settings().model_dir
            _runtime = load_runtime(model_dir)
        return _runtime


def _forget_runtime_in_child() -> None:
    global _runtime, _runtime_lock
    _runtime = None
    # The parent may have held the lock at the fork; the child gets a fresh one.
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_runtime_in_child)
