"""The ghost_mannequin operation end to end, with the classical test inpainter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from tests.garments import GREEN, DiffusionTestInpainter, Scene, make_scene
from workers.pipelines.contracts import JobCancelled
from workers.pipelines.ghost.pipeline import (
    NEGATIVE_PROMPT,
    GhostParams,
    GhostResult,
    NotAGhostPhoto,
    finish_ghost,
    ghost_mannequin,
    prepare_ghost,
    working_size,
)
from workers.pipelines.ghost.segmentation import dilate, erode

PARAMS = GhostParams(size=480, steps=8, seed=7)


@pytest.fixture(scope="module")
def tee() -> Scene:
    return make_scene("top")


@pytest.fixture(scope="module")
def tee_result(tee: Scene) -> GhostResult:
    return ghost_mannequin(
        tee.pil(),
        inpainter=DiffusionTestInpainter(),
        params=GhostParams(size=480, steps=8, seed=7, debug_layers=True),
    )


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_working_size_is_a_multiple_of_eight() -> None:
    assert working_size(360, 480, 480) == (360, 480)
    assert working_size(360, 480, 400) == (304, 400)
    assert working_size(4000, 3000, 1024) == (1024, 768)
    w, h = working_size(1001, 777, 999)
    assert w == 1000 and h % 8 == 0


def test_output_size_and_alpha_against_ground_truth(tee: Scene, tee_result: GhostResult) -> None:
    assert tee_result.image.mode == "RGB" and tee_result.image.size == (360, 480)
    alpha = np.asarray(tee_result.alpha) / 255.0
    assert (alpha[erode(tee.garment, 2)] >= 0.5).mean() > 0.995
    assert (alpha[erode(tee.neck, 1)] >= 0.5).mean() > 0.95
    assert (alpha[tee.backdrop & ~dilate(tee.hidden, 3)] < 0.5).mean() > 0.995
    removed = tee.body & ~dilate(tee.hidden | tee.garment, 3)
    assert (alpha[removed] < 0.1).mean() > 0.99
    rgb = np.asarray(tee_result.image)
    assert (rgb[alpha == 0.0] == 255).all()  # pure white where nothing is


def test_report_and_prompt(tee_result: GhostResult) -> None:
    report = tee_result.report
    assert report["garment_type"] == "top"
    assert report["garment_colours"] == ["navy"]
    assert report["needs_review"] is False
    prompt = report["prompt"]
    assert isinstance(prompt, str) and "navy" in prompt and "top" in prompt
    kinds = sorted(o["kind"] for o in report["openings"])  # type: ignore[attr-defined]
    assert kinds == ["hem", "neck", "sleeve", "sleeve"]
    assert "mannequin" in NEGATIVE_PROMPT and "skin" in NEGATIVE_PROMPT
    assert tee_result.gpu_seconds == pytest.approx(0.008)
    assert report["gpu_seconds"] == pytest.approx(0.008)


def test_debug_layers(tee_result: GhostResult) -> None:
    assert {"garment", "body", "neck", "sleeves", "hem", "remove", "inpaint_mask", "alpha"} <= set(
        tee_result.layers
    )
    assert all(im.size == (360, 480) for im in tee_result.layers.values())


def test_request_is_cropped_to_the_garment(tee: Scene) -> None:
    inpainter = DiffusionTestInpainter()
    ghost_mannequin(tee.pil(), inpainter=inpainter, params=PARAMS)
    (request,) = inpainter.requests
    w, h = request.image.size
    assert w % 8 == 0 and h % 8 == 0
    assert w * h < 0.6 * 360 * 480
    assert request.mask.size == (w, h) and request.mask.mode == "L"
    assert set(np.unique(np.asarray(request.mask)).tolist()) == {0, 255}
    assert (request.seed, request.steps, request.guidance) == (7, 8, PARAMS.guidance)
    assert "mannequin" in request.negative_prompt
    # The model never sees the mannequin: removed body is painted as backdrop.
    crop = np.asarray(request.image).astype(float)
    assert crop.min(axis=2).max() < 250  # not blown out
    assert (np.abs(crop - np.array([224, 196, 168])).sum(axis=2) < 30).mean() < 0.002


def test_same_seed_same_output_different_seed_differs(tee: Scene) -> None:
    a = ghost_mannequin(tee.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    b = ghost_mannequin(tee.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    assert _png(a.image) == _png(b.image)
    assert _png(a.alpha) == _png(b.alpha)
    c = ghost_mannequin(
        tee.pil(), inpainter=DiffusionTestInpainter(), params=GhostParams(size=480, steps=8)
    )
    diff = np.any(np.asarray(a.image) != np.asarray(c.image), axis=2)
    assert diff.any()
    job = prepare_ghost(tee.pil(), params=PARAMS)
    # Only generated pixels change, and the soft outline next to them, whose colour is
    # taken from the solid garment nearby (edge decontamination, a few pixels' reach).
    assert not (diff & ~dilate(job.generate, 6)).any()


def test_progress_is_reported_per_step(tee: Scene) -> None:
    calls: list[tuple[int, int]] = []
    ghost_mannequin(
        tee.pil(),
        inpainter=DiffusionTestInpainter(),
        params=PARAMS,
        progress=lambda s, t: calls.append((s, t)),
    )
    assert calls == [(i, 8) for i in range(1, 9)]


def test_cancel_from_progress_stops_the_job(tee: Scene) -> None:
    inpainter = DiffusionTestInpainter()

    def cancel_at_three(step: int, total: int) -> None:
        if step == 3:
            raise JobCancelled

    with pytest.raises(JobCancelled):
        ghost_mannequin(tee.pil(), inpainter=inpainter, params=PARAMS, progress=cancel_at_three)
    assert inpainter.steps_run == 3


def test_transparent_background_with_shadow() -> None:
    scene = make_scene("trousers", garment_rgb=GREEN)
    params = GhostParams(size=480, steps=4, background="transparent", shadow=True)
    result = ghost_mannequin(scene.pil(), inpainter=DiffusionTestInpainter(), params=params)
    assert result.image.mode == "RGBA"
    rgba = np.asarray(result.image)
    alpha = np.asarray(result.alpha)
    assert (rgba[..., 3] >= alpha).all()  # the shadow only adds opacity
    below = rgba[440:452, 150:210, 3]  # just under the trouser hems
    assert below.max() > 0
    assert rgba[5:40, :, 3].max() == 0  # nothing left of the waist form's top
    assert result.report["garment_type"] == "trousers"


def test_white_background_shadow_darkens_only_below(tee: Scene) -> None:
    plain = ghost_mannequin(tee.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    params = GhostParams(size=480, steps=8, seed=7, shadow=True)
    shaded = ghost_mannequin(tee.pil(), inpainter=DiffusionTestInpainter(), params=params)
    under = (slice(312, 322), slice(140, 220))  # just below the hem
    assert np.asarray(plain.image)[under].min() == 255
    assert np.asarray(shaded.image)[under].mean() < 250
    assert np.asarray(shaded.image)[:40].min() == 255  # no shadow above the garment


def test_caller_masks_at_input_resolution(tee: Scene) -> None:
    big = tee.pil().resize((720, 960), Image.Resampling.BICUBIC)
    garment = np.asarray(Image.fromarray(tee.garment).resize((720, 960), Image.Resampling.NEAREST))
    body = np.asarray(Image.fromarray(tee.body).resize((720, 960), Image.Resampling.NEAREST))
    result = ghost_mannequin(
        big,
        inpainter=DiffusionTestInpainter(),
        params=PARAMS,
        garment_mask=garment,
        body_mask=body,
    )
    assert result.image.size == (360, 480)
    assert result.report["segmentation"] == "supplied"
    alpha = np.asarray(result.alpha) / 255.0
    assert (alpha[erode(tee.garment, 2)] >= 0.5).mean() > 0.995


def test_explicit_garment_type_is_used(tee: Scene) -> None:
    job = prepare_ghost(tee.pil(), params=GhostParams(size=480, garment_type="dress"))
    assert job.info["garment_type"] == "dress"
    assert "dress" in job.prompt


def test_prepared_jobs_can_be_batched(tee: Scene) -> None:
    dress = make_scene("dress", wearer="model")
    jobs = [prepare_ghost(s.pil(), params=PARAMS) for s in (tee, dress)]
    inpainter = DiffusionTestInpainter()
    requests = [j.request for j in jobs if j.request is not None]
    results = inpainter.inpaint_batch(requests)
    batched = [finish_ghost(j, r) for j, r in zip(jobs, results, strict=True)]
    single = ghost_mannequin(tee.pil(), inpainter=DiffusionTestInpainter(), params=PARAMS)
    assert _png(batched[0].image) == _png(single.image)
    assert batched[1].report["garment_type"] == "dress"


def test_finish_requires_the_inpainting_result(tee: Scene) -> None:
    job = prepare_ghost(tee.pil(), params=PARAMS)
    with pytest.raises(ValueError, match="result is required"):
        finish_ghost(job, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"background": "grey"}, "background"),
        ({"size": 32}, "size"),
        ({"steps": 0}, "steps"),
        ({"strength": 0.0}, "strength"),
    ],
)
def test_params_are_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GhostParams(**kwargs)  # type: ignore[arg-type]


def _odd_inputs() -> dict[str, NDArray[np.uint8]]:
    rng = np.random.default_rng(0)
    plain = np.full((200, 150, 3), 230, np.uint8)
    box, half, band = plain.copy(), plain.copy(), plain.copy()
    box[50:150, 40:110] = (30, 40, 90)
    half[:, :75] = (30, 40, 90)
    band[90:110, :] = (200, 20, 20)
    gradient = np.zeros((200, 150, 3), np.uint8)
    gradient[...] = np.linspace(0, 255, 150, dtype=np.float32).astype(np.uint8)[None, :, None]
    cases = {
        "white": np.full((100, 80, 3), 255, np.uint8),
        "black": np.zeros((100, 80, 3), np.uint8),
        "noise": rng.integers(0, 256, (120, 90, 3), dtype=np.uint8),
        "tiny": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "thin": rng.integers(0, 256, (300, 12, 3), dtype=np.uint8),
        "wide": rng.integers(0, 256, (10, 400, 3), dtype=np.uint8),
        "gradient": gradient,
        "box": box,
        "half": half,
        "band": band,
    }
    for i in range(3):
        h, w = (int(v) for v in rng.integers(40, 300, 2))
        blocks = rng.integers(0, 3, (h, w, 3)) * 127
        cases[f"blocks-{i}"] = blocks.astype(np.uint8)
    return cases


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", list(_odd_inputs()))
def test_odd_photos_are_refused_or_processed_never_crash(name: str, size: int) -> None:
    image = _odd_inputs()[name]
    refusal: NotAGhostPhoto | None = None
    try:
        job = prepare_ghost(image, params=GhostParams(size=size, steps=2))
    except NotAGhostPhoto as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.code in {"no-garment-found", "no-backdrop-found"}
        assert str(refusal)
        return
    inpainter = DiffusionTestInpainter()
    result = finish_ghost(job, inpainter.inpaint(job.request) if job.request else None)
    assert result.image.size == result.alpha.size
    assert isinstance(result.report["needs_review"], bool)
