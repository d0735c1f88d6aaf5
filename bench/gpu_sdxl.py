"""GPU cost of SDXL inpainting at the real model sizes, with random weights.

Builds a StableDiffusionXLInpaintPipeline whose UNet, VAE and text encoders have the sizes of
stabilityai/stable-diffusion-xl-1.0-inpainting-0.1 (configs written out below, nothing is
downloaded), then measures, at 1024x1024, 30 steps, bfloat16:

- the bf16 matmul rate of the card and the FLOPs of one image (counted with
  ``torch.utils.flop_counter``), whose ratio is the arithmetic floor in seconds per image;
- GPU-seconds per image at batch 1, 4 and 8, eager and with ``torch.compile`` on the UNet
  (compilation happens in a warm-up call outside the timing), plus one UNet step's time;
- the worker path: 8 jobs through ``ModelRuntime.inpaint_batch`` and their metered seconds.

Random weights cost the same FLOPs as trained ones; the images are noise. Each stage is
written to ``--out`` as it finishes, so a run cut short still leaves its results, and a stage
that fails records its error and the run goes on. ``--tiny`` runs the same code on the tiny
test model, on CPU unless a GPU is present, as a smoke check.

Run from the repository root: ``python bench/gpu_sdxl.py --out gpu_sdxl.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the project importable without installing it.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from workers.models.runtime import ModelRuntime, denoising_steps
from workers.models.tiny import SCHEDULER_CONFIG, make_tiny_pipeline, make_tokenizer
from workers.pipelines.contracts import InpaintRequest

# stabilityai/stable-diffusion-xl-1.0-inpainting-0.1, unet/config.json.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 9,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled text
    "upcast_attention": None,
}

# The SDXL VAE (vae/config.json).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# CLIP ViT-L/14's text tower (text_encoder/config.json). The tokenizer is the tiny model's
# byte-level one: prompts still pad to 77 tokens, so the encoders do the same work.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}

# OpenCLIP ViT-bigG/14's text tower with its projection (text_encoder_2/config.json).
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}

# The byte-level tokenizer's start and end ids (its last two entries), so pooling finds them.
SPECIAL_IDS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}


def build_real_pipeline(device: torch.device) -> StableDiffusionXLInpaintPipeline:
    """Random weights at SDXL inpainting's sizes, initialised directly on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG, **SPECIAL_IDS))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, **SPECIAL_IDS)
        )
    return StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def make_requests(count: int, size: int, steps: int, strength: float) -> list[InpaintRequest]:
    """Noise images with a centred mask (a neck-opening-sized hole), distinct prompts and seeds."""
    rng = random.Random(0)
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size * 3 // 8, size // 8, size * 5 // 8, size * 3 // 8))
    return [
        InpaintRequest(
            image=image,
            mask=mask,
            prompt=f"inside of a garment, neck label, fabric texture {i}",
            negative_prompt="person, skin, mannequin",
            seed=i,
            steps=steps,
            strength=strength,
            guidance=7.0,
        )
        for i in range(count)
    ]


class Bench:
    """Runs the stages, keeps the results and writes them after each stage."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {"args": vars(args), "stages": {}}
        self.device = torch.device(args.device)
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.runtime: ModelRuntime | None = None

    # --- plumbing

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        budget = float(self.args.budget_s)
        return self.elapsed() > budget

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=2, default=str) + "\n", encoding="utf-8")

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if self.over_budget():
            self.results["stages"][name] = {"skipped": f"time budget of {self.args.budget_s} s"}
        else:
            began = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:
                result = {"error": repr(exc), "traceback": traceback.format_exc(limit=8)}
            result["stage_s"] = round(time.perf_counter() - began, 2)
            self.results["stages"][name] = result
        print(f"[{self.elapsed():6.1f} s] {name}: {self.results['stages'][name]}", flush=True)
        self.save()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Device seconds of ``fn``: CUDA events on a GPU, wall time on a CPU."""
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

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(float(torch.cuda.max_memory_allocated()) / 2**30, 2)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    @property
    def pipe(self) -> StableDiffusionXLInpaintPipeline:
        assert self.runtime is not None, "the build stage failed"
        return self.runtime.pipeline

    def call(self, requests: list[InpaintRequest], steps: int) -> Any:
        """One pipeline call the way the runtime makes it, with a fresh scheduler."""
        pipe = self.pipe
        pipe.scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        first = requests[0]
        width, height = first.image.size
        return pipe(
            prompt=[r.prompt for r in requests],
            negative_prompt=[r.negative_prompt for r in requests],
            image=[r.image for r in requests],
            mask_image=[r.mask for r in requests],
            height=height,
            width=width,
            num_inference_steps=steps,
            strength=first.strength,
            guidance_scale=first.guidance,
            generator=[torch.Generator(self.device).manual_seed(r.seed) for r in requests],
            output_type="np",
        )

    def unet_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One denoising step's UNet inputs for one image with classifier-free guidance."""
        pipe = self.pipe
        latent = self.args.size // pipe.vae_scale_factor
        kw = {"device": self.device, "dtype": self.dtype}
        sample = torch.randn(2, pipe.unet.config.in_channels, latent, latent, **kw)
        timestep = torch.tensor(999.0, device=self.device)
        hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, **kw)
        pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, **kw)
        size = float(self.args.size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * 2, **kw)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return (sample, timestep), {"encoder_hidden_states": hidden, "added_cond_kwargs": added}

    # --- stages

    def environment(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "device": str(self.device),
            "dtype": str(self.dtype),
            "model": "tiny" if self.args.tiny else "sdxl-inpainting-0.1 sizes, random weights",
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
        return info

    def build(self) -> dict[str, Any]:
        pipe = make_tiny_pipeline() if self.args.tiny else build_real_pipeline(self.device)
        self.runtime = ModelRuntime.from_pipeline(pipe, self.device, self.dtype)
        self.sync()
        params = {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        }
        return {"params": params, "peak_gib": self.peak_gib()}

    def matmul_rate(self) -> dict[str, Any]:
        n = 1024 if self.args.tiny else 8192
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        for _ in range(3):
            torch.mm(a, b)
        iters = 5 if self.args.tiny else 50

        def run() -> None:
            for _ in range(iters):
                torch.mm(a, b)

        _, seconds = self.timed(run)
        rate = 2 * n**3 * iters / seconds
        self.results["matmul_flops_per_s"] = rate
        return {"n": n, "tflops": round(rate / 1e12, 2)}

    def flops(self) -> dict[str, Any]:
        steps = denoising_steps(self.args.steps, self.args.strength)
        args, kwargs = self.unet_inputs()
        with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
            self.pipe.unet(*args, **kwargs)
        # A one-step call counts everything besides the other steps: both text encoders, the
        # VAE encodes of the image and the masked image, one UNet step and the decode.
        one_step = make_requests(1, self.args.size, 1, 1.0)
        with FlopCounterMode(display=False) as call_counter:
            self.call(one_step, 1)
        unet_step = unet_counter.get_total_flops()
        per_image = call_counter.get_total_flops() + (steps - 1) * unet_step
        self.results["flops_per_image"] = per_image
        result: dict[str, Any] = {
            "unet_step_gflop": round(unet_step / 1e9, 3),
            "image_gflop": round(per_image / 1e9, 1),
            "steps": steps,
        }
        rate = self.results.get("matmul_flops_per_s")
        if rate:
            floor = per_image / rate
            self.results["floor_s_per_image"] = floor
            result["floor_s_per_image"] = round(floor, 3)
        return result

    def unet_step_ms(self, label: str) -> dict[str, Any]:
        args, kwargs = self.unet_inputs()
        with torch.no_grad():
            for _ in range(3):
                self.pipe.unet(*args, **kwargs)
            iters = 3 if self.args.tiny else 10

            def run() -> None:
                for _ in range(iters):
                    self.pipe.unet(*args, **kwargs)

            _, seconds = self.timed(run)
        ms = seconds / iters * 1000
        self.results.setdefault("unet_step_ms", {})[label] = ms
        return {"unet_step_ms": round(ms, 2)}

    def batches(self, label: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for batch in self.args.batches:
            if self.over_budget():
                result[f"b{batch}"] = {"skipped": "time budget"}
                continue
            requests = make_requests(batch, self.args.size, self.args.steps, self.args.strength)
            began = time.perf_counter()
            # Warm-up outside the timing: compilation (a new batch size may recompile),
            # allocator growth and kernel selection.
            self.call(requests, 2)
            self.sync()
            warmup = time.perf_counter() - began
            self.reset_peak()
            _, seconds = self.timed(partial(self.call, requests, self.args.steps))
            per_image = seconds / batch
            self.results.setdefault("gpu_s_per_image", {}).setdefault(label, {})[batch] = per_image
            result[f"b{batch}"] = {
                "gpu_s_per_image": round(per_image, 3),
                "call_s": round(seconds, 3),
                "warmup_s": round(warmup, 1),
                "peak_gib": self.peak_gib(),
            }
            # Keep each batch size's numbers even if a later one is cut off.
            self.results["stages"][label] = {**result, "partial": True}
            self.save()
        return result

    def compile_unet(self) -> dict[str, Any]:
        # One static graph per batch size, as a service with fixed batch sizes would run.
        # Automatic dynamic shapes would not save compiles here: the dynamic graph guards
        # the batch below 16, so batch 8 (16 with guidance) compiled a third time anyway.
        torch._dynamo.config.automatic_dynamic_shapes = False
        # In place, so the pipeline and the runtime keep the same module object.
        self.pipe.unet.compile(mode=self.args.compile_mode)
        return {"mode": self.args.compile_mode, "dynamic_shapes": False}

    def worker_path(self) -> dict[str, Any]:
        assert self.runtime is not None
        requests = make_requests(
            self.args.jobs, self.args.size, self.args.steps, self.args.strength
        )
        # Warm-up outside the timing with the same shapes (a short run), in case this batch
        # size is new to a compiled UNet.
        self.runtime.inpaint_batch([replace(r, steps=2) for r in requests])
        began = time.perf_counter()
        results = self.runtime.inpaint_batch(requests)
        wall = time.perf_counter() - began
        per_job = [r.gpu_seconds for r in results]
        self.results["worker_gpu_s_per_job"] = per_job[0]
        return {
            "jobs": len(results),
            "gpu_s_per_job": [round(s, 3) for s in per_job],
            "gpu_s_total": round(sum(per_job), 3),
            "wall_s": round(wall, 3),
            "sizes_ok": all(r.image.size == requests[0].image.size for r in results),
            "unet_compiled": "error" not in self.results["stages"].get("compile", {"error": 0}),
        }

    def run(self) -> None:
        self.stage("environment", self.environment)
        self.stage("build", self.build)
        self.stage("matmul", self.matmul_rate)
        self.stage("flops", self.flops)
        self.stage("unet_step_eager", lambda: self.unet_step_ms("eager"))
        self.stage("eager", lambda: self.batches("eager"))
        if self.args.compile:
            self.stage("compile", self.compile_unet)
            self.stage("unet_step_compiled", lambda: self.unet_step_ms("compiled"))
            self.stage("compiled", lambda: self.batches("compiled"))
        self.stage("worker", self.worker_path)
        self.results["summary"] = self.summary()
        self.save()
        print(self.results["summary"], flush=True)

    def summary(self) -> str:
        r = self.results
        gpu = r["stages"].get("environment", {}).get("gpu", str(self.device))

        def per_image(label: str) -> str:
            values = r.get("gpu_s_per_image", {}).get(label, {})
            cells = [f"b{b}={values[b]:.3f}" for b in self.args.batches if b in values]
            return " ".join(cells) or "n/a"

        def num(key: str, fmt: str) -> str:
            value = r.get(key)
            return format(value, fmt) if isinstance(value, float | int) else "n/a"

        steps = r.get("unet_step_ms", {})
        unet = " -> ".join(f"{steps[k]:.1f}" for k in ("eager", "compiled") if k in steps)
        failed = [k for k, v in r["stages"].items() if "error" in v or "skipped" in v]
        return (
            f"SDXL inpaint {'tiny' if self.args.tiny else 'real-size'} {self.dtype} "
            f"{self.args.size}px {self.args.steps} steps on {gpu}: GPU-s/image eager "
            f"[{per_image('eager')}] compiled [{per_image('compiled')}]; UNet step ms "
            f"[{unet or 'n/a'}]; floor {num('floor_s_per_image', '.3f')} s/image at "
            f"{num('matmul_flops_per_s', '.3e')} FLOP/s; worker "
            f"{num('worker_gpu_s_per_job', '.3f')} GPU-s/job; "
            f"{'failed or skipped: ' + ','.join(failed) if failed else 'all stages ran'}; "
            f"{self.elapsed():.0f} s total; results in {self.args.out}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--tiny`` switches the defaults to a quick CPU smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (smoke check)")
    parser.add_argument("--out", default="gpu_sdxl.json", help="where the JSON results go")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--size", type=int, default=None, help="square side in pixels")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--jobs", type=int, default=8, help="jobs through the worker path")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for a CPU run (on shared small machines more threads run slower)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"],
        help="max-autotune modes tune GEMMs for minutes per shape; mind the budget",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="stop starting new stages and batch sizes after this many seconds",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = 128 if args.tiny else 1024
    if not args.tiny and torch.device(args.device).type != "cuda":
        parser.error("the real-size model needs a CUDA device; use --tiny for a CPU smoke run")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every stage; exit status 1 if any stage failed."""
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.run()
    failed = any("error" in v for v in bench.results["stages"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
