"""The model the GPU worker serves, settled before any server starts.

The GPU worker serves the model at ``HM_MODEL_DIR``; when that is unset, ``up`` makes a tiny
randomly initialised SDXL inpainting model once under ``HM_DATA_DIR`` (in a subprocess: torch
stays out of this process) and says so, since its outputs only show the pipeline working.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hiddenmodel.processes import Child, Children, hiddenmodel_argv
from hiddenmodel.up.supervisor import UpError

MODEL_ENV = "HM_MODEL_DIR"
# Under HM_DATA_DIR: where up keeps the tiny random model it makes when HM_MODEL_DIR is unset.
TINY_MODEL_DIR = Path("models") / "tiny-sdxl-inpaint"
# Building the tiny model is mostly importing torch and diffusers (seconds); loading a real
# checkpoint from a slow disk can take minutes.
MODEL_MAKE_TIMEOUT_S = 300.0
MODEL_LOAD_TIMEOUT_S = 600.0


def ai_installed() -> bool:
    """Whether torch and diffusers (the ``ai`` extra) are installed, found without importing
    them: importing torch takes seconds and up itself never needs it."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def nvidia_gpu_visible() -> bool:
    """Whether the GPU worker will see an NVIDIA GPU, judged without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


@dataclass
class ModelPlan:
    """The model the GPU worker serves, settled before any server starts."""

    # None: no GPU worker; ``note`` says why.
    path: Path | None
    # Made by up with random weights: the banner must say what its outputs are worth.
    tiny: bool = False
    # Random weights (up's tiny model, or one HM_MODEL_DIR names): its inpainting is noise.
    random_weights: bool = False
    note: str = ""
    # The tiny model being made, in the background while the servers start.
    maker: Child | None = None
    staging: Path | None = None

    def finish(self, children: Children) -> None:
        """Wait for the tiny model being made, then move it into place."""
        maker, staging = self.maker, self.staging
        if maker is None or staging is None or self.path is None:
            return
        deadline = time.monotonic() + MODEL_MAKE_TIMEOUT_S
        while maker.exit_code() is None:
            children.ensure_running()
            if time.monotonic() > deadline:
                self.abandon()
                raise UpError(
                    f"making the tiny model took over {MODEL_MAKE_TIMEOUT_S:.0f} s"
                    f"{maker.log_tail()}"
                )
            time.sleep(0.1)
        self.maker = None
        if maker.exit_code() != 0:
            raise UpError(maker.failure())
        # Made in a staging folder and moved in whole: a run stopped halfway leaves no
        # half-written model that a later run would take for complete.
        shutil.rmtree(self.path, ignore_errors=True)
        staging.rename(self.path)
        print(f"tiny model ready in {self.path}", flush=True)

    def abandon(self) -> None:
        """Stop making the model (up is stopping); the next run starts it again."""
        if self.maker is not None:
            self.maker.stop()
            self.maker = None


def plan_model(data_dir: Path) -> ModelPlan:
    """Settle the GPU worker's model before anything starts, so a bad one costs nothing.

    ``HM_MODEL_DIR`` set: it must pass the check the worker itself makes at start (the same
    function, so the same message naming what is missing), segmenter folders included. Unset:
    a tiny random model under ``HM_DATA_DIR``, made once by ``hiddenmodel make-tiny-model`` in
    a subprocess, so that torch is never imported here, and reused by later runs. The tiny
    model has no learned segmenters: random ones would find no garment in the demo photo.
    """
    from workers.gpu import check_models
    from workers.models import ModelDirError
    from workers.models.runtime import RANDOM_WEIGHTS_FILE

    configured = os.environ.get(MODEL_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser().resolve()
        if not ai_installed():
            raise UpError(
                f"{MODEL_ENV} is set, but torch and diffusers (the `ai` extra) are not "
                "installed: pip install -e '.[ai]' (scripts/up does)"
            )
        try:
            check_models(path)
        except ModelDirError as exc:
            raise UpError(
                f"the GPU worker would refuse to start: {exc}.\n"
                f"  {MODEL_ENV} must name an SDXL inpainting checkpoint in diffusers format "
                '(README.md, "Models"); unset it to run on a tiny random model instead'
            ) from exc
        os.environ[MODEL_ENV] = str(path)
        return ModelPlan(path, random_weights=(path / RANDOM_WEIGHTS_FILE).is_file())
    if not ai_installed():
        return ModelPlan(
            None,
            note="ghost_mannequin needs torch and diffusers (the `ai` extra): "
            "pip install -e '.[ai]' (scripts/up does). No GPU worker runs, so its jobs wait "
            "in the queue.",
        )
    path = data_dir / TINY_MODEL_DIR
    os.environ[MODEL_ENV] = str(path)
    try:
        check_models(path)
        return ModelPlan(path, tiny=True, random_weights=True)
    except ModelDirError:
        pass
    staging = path.with_name(f"{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(
        f"{MODEL_ENV} is unset: making a tiny random SDXL inpainting model in {path} "
        "(once; later runs reuse it)",
        flush=True,
    )
    maker = Child(
        name="make-tiny-model",
        argv=hiddenmodel_argv("make-tiny-model", str(staging)),
        log_path=data_dir / "log" / "make-tiny-model.log",
        die_with_parent=True,
    )
    maker.start()
    return ModelPlan(path, tiny=True, random_weights=True, maker=maker, staging=staging)


def model_lines(model: ModelPlan) -> list[str]:
    """What the banner says about the model, above all when its weights are random."""
    if model.path is None:
        return [f"Model: none. {model.note}"]
    if nvidia_gpu_visible():
        device = (
            "  An NVIDIA GPU is visible: the GPU worker runs the model on it in bf16 "
            "(with a CUDA build of torch)."
        )
    else:
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        device = (
            "  No NVIDIA GPU is visible: the GPU worker runs the model on the CPU in fp32 "
            f"(OMP_NUM_THREADS={threads})."
        )
    if not model.tiny:
        return [f"Model: {MODEL_ENV}={model.path}", device]
    return [
        "Model: a TINY, RANDOMLY INITIALISED SDXL inpainting model, not a trained one",
        f"  ({MODEL_ENV} is unset; `hiddenmodel make-tiny-model` made it in {model.path}).",
        "  ghost_mannequin runs its whole pipeline with it (segmentation, inpainting,",
        "  compositing, the quality report), but what it paints into the neck and the openings",
        "  is noise: its outputs show the pipeline working, not a real reconstruction.",
        f"  For real results, point {MODEL_ENV} at an SDXL inpainting checkpoint in diffusers",
        '  format (README.md, "Models") and start again, e.g.',
        f"    {MODEL_ENV}=/srv/models/stable-diffusion-xl-1.0-inpainting-0.1 scripts/up",
        device,
    ]
