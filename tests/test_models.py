"""The SDXL inpainting runtime on a tiny random checkpoint of the real classes, on CPU."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# With two shared cores, more threads make these small models many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The test command installs the `ai` extra: a missing torch is a failure, not a skip.
import torch

from workers.models import runtime as runtime_module
from workers.models.runtime import (
    ModelDirError,
    ModelOutOfMemory,
    ModelRuntime,
    check_model_dir,
    denoising_steps,
    get_runtime,
    load_runtime,
    reduced_size,
)
from workers.models.tiny import make_tiny_model
from workers.pipelines.contracts import InpaintRequest, JobCancelled

# diffusers' Euler scheduler builds arrays from tensors the way numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

WIDTH, HEIGHT = 96, 64
STEPS, STRENGTH = 8, 0.75  # 8 * 0.75 is exact: 6 steps run


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("tiny-sdxl")
    make_tiny_model(directory)
    return directory


@pytest.fixture(scope="session")
def rt(model_dir: Path) -> ModelRuntime:
    return load_runtime(model_dir, device="cpu")


@pytest.fixture
def broken_dir(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")


def _mask() -> Image.Image:
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (24, 16, 72, 48))
    return mask


def request(seed: int = 1, prompt: str = "a white shirt", **changes: Any) -> InpaintRequest:
    fields: dict[str, Any] = {
        "image": _image(),
        "mask": _mask(),
        "prompt": prompt,
        "negative_prompt": "blurry",
        "seed": seed,
        "steps": STEPS,
        "strength": STRENGTH,
        "guidance": 5.0,
    }
    fields.update(changes)
    return InpaintRequest(**fields)


def pixels(image: Image.Image) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(image, dtype=np.float64) / 255.0


# --- the tiny checkpoint and the model directory check


def test_tiny_model_is_the_real_classes(rt: ModelRuntime, model_dir: Path) -> None:
    pipe = rt.pipeline
    assert type(pipe).__name__ == "StableDiffusionXLInpaintPipeline"
    assert pipe.unet.config.in_channels == 9
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae_scale_factor == 8
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    params = sum(
        p.numel()
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
        for p in m.parameters()
    )
    assert 200_000 < params < 600_000
    assert check_model_dir(model_dir) == model_dir


def test_tiny_model_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    make_tiny_model(tmp_path)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / name).read_bytes() == (model_dir / name).read_bytes()


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("model_index.json", "missing model_index.json"),
        ("unet", "missing subfolder unet/"),
        ("vae/diffusion_pytorch_model.safetensors", "missing vae/diffusion_pytorch_model"),
        ("text_encoder_2/model.safetensors", "missing text_encoder_2/model.safetensors"),
        ("text_encoder/config.json", "missing text_encoder/config.json"),
        ("tokenizer_2/tokenizer.json", "missing tokenizer_2/tokenizer.json"),
        ("scheduler/scheduler_config.json", "missing scheduler/scheduler_config.json"),
    ],
)
def test_check_model_dir_names_the_missing_piece(broken_dir: Path, remove: str, named: str) -> None:
    target = broken_dir / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(ModelDirError) as caught:
        check_model_dir(broken_dir)
    assert named in str(caught.value)
    assert len(caught.value.problems) == 1, caught.value.problems


def test_check_model_dir_lists_every_problem(broken_dir: Path) -> None:
    shutil.rmtree(broken_dir / "vae")
    (broken_dir / "unet" / "config.json").unlink()
    with pytest.raises(ModelDirError) as caught:
        load_runtime(broken_dir, device="cpu")
    assert caught.value.problems == ["missing unet/config.json", "missing subfolder vae/"]


def test_check_model_dir_without_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "nowhere")
    with pytest.raises(ModelDirError, match="HM_MODEL_DIR"):
        check_model_dir(None)


# --- inpainting


def test_output_size_and_metering(rt: ModelRuntime) -> None:
    result = rt.inpaint(request())
    assert result.image.size == (WIDTH, HEIGHT)
    assert result.image.mode == "RGB"
    assert result.gpu_seconds > 0


def test_same_seed_same_output_other_seed_differs(rt: ModelRuntime) -> None:
    first = pixels(rt.inpaint(request(seed=7)).image)
    again = pixels(rt.inpaint(request(seed=7)).image)
    other = pixels(rt.inpaint(request(seed=8)).image)
    np.testing.assert_allclose(first, again, atol=1e-4)
    assert np.abs(first - other).max() > 0.1


def test_pixels_outside_the_mask_are_kept(rt: ModelRuntime) -> None:
    req = request()
    keep = np.asarray(req.mask) == 0
    original = pixels(req.image)
    out = pixels(rt.inpaint(req).image)
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).max() > 0.1

    # The 9-channel pipeline itself regenerates every pixel through the VAE, which is why
    # the runtime composites the input back.
    raw = rt.pipeline(
        prompt=req.prompt,
        image=req.image,
        mask_image=req.mask,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        strength=STRENGTH,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).images[0]
    assert np.abs(raw[keep] - original[keep]).max() > 0.1


def test_progress_once_per_executed_step(rt: ModelRuntime) -> None:
    calls: list[tuple[int, int]] = []
    rt.inpaint(request(), lambda step, total: calls.append((step, total)))
    assert calls == [(s, 6) for s in range(1, 7)]

    calls.clear()
    rt.inpaint(request(steps=10), lambda step, total: calls.append((step, total)))
    assert len(calls) == denoising_steps(10, STRENGTH) == 7
    # The pipeline truncates the floating-point product.
    assert denoising_steps(100, 0.29) == 28


def test_cancel_stops_at_the_next_step(rt: ModelRuntime) -> None:
    unet_calls = 0

    def count(*_: Any) -> None:
        nonlocal unet_calls
        unet_calls += 1

    calls: list[int] = []

    def cancel_at_two(step: int, total: int) -> None:
        calls.append(step)
        if step == 2:
            raise JobCancelled("stopped by the user")

    hook = rt.pipeline.unet.register_forward_hook(count)
    try:
        with pytest.raises(JobCancelled, match="stopped by the user"):
            rt.inpaint(request(), cancel_at_two)
        assert calls == [1, 2]
        assert unet_calls == 2
        assert rt.pipeline._interrupt is False

        unet_calls = 0
        steps: list[int] = []
        result = rt.inpaint(request(), lambda step, total: steps.append(step))
    finally:
        hook.remove()
    assert steps == [1, 2, 3, 4, 5, 6]
    assert unet_calls == 6
    assert result.image.size == (WIDTH, HEIGHT)


def test_batch_matches_single_runs(rt: ModelRuntime) -> None:
    requests = [request(1), request(2, "a red dress"), request(3, "a knitted jumper")]
    steps: list[int] = []
    batch = rt.inpaint_batch(requests, lambda step, total: steps.append(step))
    assert len(batch) == 3
    assert steps == [1, 2, 3, 4, 5, 6]
    assert batch[0].gpu_seconds > 0
    assert batch[0].gpu_seconds == batch[1].gpu_seconds == batch[2].gpu_seconds
    for together, req in zip(batch, requests, strict=True):
        alone = rt.inpaint(req)
        # Batched convolutions round differently: allow one or two levels of 255.
        assert np.abs(pixels(together.image) - pixels(alone.image)).max() <= 2 / 255 + 1e-9


def test_batch_rejects_mixed_requests(rt: ModelRuntime) -> None:
    with pytest.raises(ValueError, match="differ"):
        rt.inpaint_batch([request(), request(steps=4)])
    assert rt.inpaint_batch([]) == []


def test_rejects_sizes_not_multiple_of_eight(rt: ModelRuntime) -> None:
    bad = request(image=_image().resize((90, 64)), mask=_mask().resize((90, 64)))
    with pytest.raises(ValueError, match="multiple of 8"):
        rt.inpaint(bad)


# --- out of memory


def test_out_of_memory_retries_once_smaller(
    rt: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_call = rt._call
    sizes: list[tuple[int, int]] = []

    def flaky(requests: Any, width: int, height: int, progress: Any) -> Any:
        sizes.append((width, height))
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(requests, width, height, progress)

    monkeypatch.setattr(rt, "_call", flaky)
    req = request()
    result = rt.inpaint(req)
    assert sizes == [(WIDTH, HEIGHT), reduced_size(WIDTH, HEIGHT)] == [(96, 64), (72, 48)]
    assert result.image.size == (WIDTH, HEIGHT)
    keep = np.asarray(req.mask) == 0
    assert np.array_equal(pixels(result.image)[keep], pixels(req.image)[keep])


def test_out_of_memory_twice_is_a_clear_error(
    rt: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always(*_: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(rt, "_call", always)
    with pytest.raises(ModelOutOfMemory, match=r"at 96x64 and again at 72x48"):
        rt.inpaint(request())


def test_a_failed_call_leaves_the_vae_in_the_runtime_dtype(
    rt: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_inside_upcast(fn: Any) -> Any:
        # What an error between the pipeline's VAE upcast and its cast back leaves behind.
        rt.pipeline.vae.to(dtype=torch.bfloat16)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(rt, "_timed", fail_inside_upcast)
    with pytest.raises(ModelOutOfMemory):
        rt.inpaint(request())
    assert rt.pipeline.vae.dtype == torch.float32
    monkeypatch.undo()
    assert rt.inpaint(request()).image.size == (WIDTH, HEIGHT)


# --- sharing and lifetime


def test_sibling_pipelines_share_the_weights(rt: ModelRuntime) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    for cls in (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline):
        sibling = rt.sibling(cls)
        assert isinstance(sibling, cls)
        assert rt.sibling(cls) is sibling
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            mine = dict(getattr(rt.pipeline, name).named_parameters())
            theirs = dict(getattr(sibling, name).named_parameters())
            assert mine.keys() == theirs.keys()
            assert all(mine[k].data_ptr() == theirs[k].data_ptr() for k in mine), name
    assert rt.inpaint(request()).image.size == (WIDTH, HEIGHT)


def test_sibling_keeps_a_reduced_precision_runtime(model_dir: Path) -> None:
    half = load_runtime(model_dir, device="cpu", dtype=torch.bfloat16)
    from diffusers import StableDiffusionXLImg2ImgPipeline

    sibling = half.sibling(StableDiffusionXLImg2ImgPipeline)
    assert half.pipeline.unet.dtype == torch.bfloat16
    assert sibling.unet.conv_in.weight.data_ptr() == half.pipeline.unet.conv_in.weight.data_ptr()


@pytest.fixture
def no_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "_runtime", None)


@pytest.mark.usefixtures("no_runtime")
def test_runtime_loads_once_per_process(model_dir: Path) -> None:
    first = get_runtime(model_dir)
    assert get_runtime() is first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it must not inherit the parent's runtime
        os.close(read)
        os.write(write, b"1" if runtime_module._runtime is None else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)


# --- dynamic batching in front of the runtime ---------------------------------------------


def test_batcher_pads_batches_and_crops_back(rt: ModelRuntime) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from workers.batching import InpaintBatcher

    batcher = InpaintBatcher(rt, max_batch=3, window=2.0)
    small = request(seed=2, image=_image().crop((0, 0, 88, 64)), mask=_mask().crop((0, 0, 88, 64)))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(batcher.inpaint, [request(seed=1), small, request(seed=3)]))
    assert [r.image.size for r in results] == [(WIDTH, HEIGHT), (88, 64), (WIDTH, HEIGHT)]
    assert all(r.batch_size == 3 for r in results)
    assert all(r.gpu_seconds > 0 for r in results)
    # Padded into a larger batch, the small request still keeps every pixel outside its mask.
    kept = pixels(results[1].image)[50:, :20]
    assert np.abs(kept - pixels(small.image)[50:, :20]).max() < 1e-6


def test_a_lone_job_does_not_wait_the_window(rt: ModelRuntime) -> None:
    """With one announced job in the process nobody can join its batch: it runs at once. A
    caller that announces nothing gets the whole window (no job is known)."""
    from workers.batching import InpaintBatcher

    batcher = InpaintBatcher(rt, max_batch=4, window=3.0)
    batcher.inpaint(request(seed=1))  # warm: the first call pays for lazy set-up
    started = time.perf_counter()
    with batcher.job():
        result = batcher.inpaint(request(seed=1))
    assert result.batch_size == 1
    assert time.perf_counter() - started < 2.0
    started = time.perf_counter()
    batcher.inpaint(request(seed=1))
    assert time.perf_counter() - started >= 3.0


def test_a_batch_waits_for_announced_jobs_that_may_still_ask(rt: ModelRuntime) -> None:
    """Two announced jobs: the first request waits (within the window) for the second, which
    asks a moment later, and both run in one batch; a third job still segmenting when both
    asked would be waited for too, and one that ended is not."""
    import threading

    from workers.batching import InpaintBatcher

    batcher = InpaintBatcher(rt, max_batch=4, window=10.0)
    both_in = threading.Barrier(2)
    results: list[Any] = []

    def job(delay: float) -> None:
        with batcher.job():
            both_in.wait()
            time.sleep(delay)
            results.append(batcher.inpaint(request(seed=1)))

    started = time.perf_counter()
    threads = [threading.Thread(target=job, args=(d,)) for d in (0.0, 0.3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.batch_size for r in results] == [2, 2]
    # Ran as soon as the second job asked, long before the 10 s window.
    assert time.perf_counter() - started < 8.0


def test_one_job_canceling_does_not_stop_its_batch(rt: ModelRuntime) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from workers.batching import InpaintBatcher

    batcher = InpaintBatcher(rt, max_batch=2, window=2.0)
    steps: list[int] = []

    def cancel_at_two(step: int, total: int) -> None:
        steps.append(step)
        if step >= 2:
            raise JobCancelled()

    def run(args: tuple[InpaintRequest, Any]) -> Any:
        try:
            return batcher.inpaint(*args)
        except JobCancelled:
            return "canceled"

    with ThreadPoolExecutor(2) as pool:
        canceled, finished = pool.map(
            run, [(request(seed=1), cancel_at_two), (request(seed=2), None)]
        )
    assert canceled == "canceled" and max(steps) == 2
    assert finished.image.size == (WIDTH, HEIGHT) and finished.batch_size == 2
