"""Operations that run without model weights: background removal on studio shots, resize.

The mattes are checked against synthetic scenes whose true coverage is known (see
``tests.imagegen``). Thresholds sit well below what the algorithm measures on these
scenes (IoU >= 0.998, mean alpha error <= 0.0015) yet far above what a broken matte
reaches; ``test_the_accuracy_bar_rejects_poor_mattes`` shows where those stand.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections import deque

import numpy as np
import pytest
from PIL import Image

from tests.imagegen import STANDARD_SCENES, Scene, dilate, iou, scene
from workers.pipelines import resize as resize_module
from workers.pipelines.background import _components, remove_background
from workers.pipelines.resize import resize

MIN_IOU = 0.99
MAX_ALPHA_ERROR = 0.01

_scenes: dict[str, Scene] = {}


def standard(name: str) -> Scene:
    """Scenes take a moment to draw; every test shares one copy of each."""
    if name not in _scenes:
        _scenes[name] = STANDARD_SCENES[name]()
    return _scenes[name]


def alpha_of(result_alpha: Image.Image) -> np.ndarray:
    return np.asarray(result_alpha, dtype=np.float32) / 255.0


def far_from_garment(truth: Scene, margin: int = 4) -> np.ndarray:
    return ~dilate(truth.alpha > 0, margin)


def deep_inside(truth: Scene, margin: int = 4) -> np.ndarray:
    return ~dilate(truth.alpha < 1, margin)


# --- matte accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STANDARD_SCENES))
def test_matte_matches_the_truth(name: str) -> None:
    truth = standard(name)
    result = remove_background(truth.image)
    alpha = alpha_of(result.alpha)
    assert iou(alpha > 0.5, truth.alpha > 0.5) >= MIN_IOU
    assert float(np.abs(alpha - truth.alpha).mean()) <= MAX_ALPHA_ERROR


def test_the_accuracy_bar_rejects_poor_mattes() -> None:
    truth = standard("navy-shirt")
    poor: dict[str, np.ndarray] = {
        "everything": np.ones_like(truth.alpha),
        "nothing": np.zeros_like(truth.alpha),
        # The right silhouette, misplaced by three pixels.
        "shifted": np.roll(truth.alpha, 3, axis=1),
        # The right silhouette with a 4-pixel halo of backdrop around it.
        "halo": dilate(truth.alpha > 0, 4).astype(np.float32),
    }
    for name, alpha in poor.items():
        accurate = iou(alpha > 0.5, truth.alpha > 0.5) >= MIN_IOU and (
            float(np.abs(alpha - truth.alpha).mean()) <= MAX_ALPHA_ERROR
        )
        assert not accurate, name


def test_soft_edges_follow_partial_coverage() -> None:
    truth = standard("green-bag")
    alpha = alpha_of(remove_background(truth.image, feather_px=0).alpha)
    edge = (truth.alpha > 0.1) & (truth.alpha < 0.9)
    assert edge.sum() > 1000
    # Measured about 0.01; a hard cut at one half is off by about 0.29 here.
    assert float(np.abs(alpha - truth.alpha)[edge].mean()) < 0.06


def test_openings_in_the_garment_stay_transparent() -> None:
    truth = standard("green-bag")
    alpha = np.asarray(remove_background(truth.image).alpha)
    h, w = alpha.shape
    # Centres of the handle opening and of the small hole, from the drawing in imagegen.
    for x, y in ((0.5, 0.30), (0.5, 0.64)):
        assert alpha[int(y * h), int(x * w)] == 0


def test_pale_garment_close_to_the_backdrop() -> None:
    truth = standard("pale-shirt")
    result = remove_background(truth.image)
    # The garment differs from the backdrop less than the backdrop's own light falloff.
    garment_vs_backdrop = np.abs(truth.foreground - truth.backdrop)[deep_inside(truth)].mean()
    assert garment_vs_backdrop < result.report["backdrop_spread"]
    assert iou(alpha_of(result.alpha) > 0.5, truth.alpha > 0.5) >= MIN_IOU


@pytest.mark.parametrize("noise", [5.0, 8.0])
def test_noisy_sensor(noise: float) -> None:
    truth = scene("shirt", (38, 52, 96), noise_sigma=noise, seed=7)
    result = remove_background(truth.image)
    assert iou(alpha_of(result.alpha) > 0.5, truth.alpha > 0.5) >= MIN_IOU
    assert result.report["noise"] == pytest.approx(noise, rel=0.2)


@pytest.mark.parametrize("name", ["navy-shirt", "striped-dress"])
def test_jpeg_compressed_input(name: str) -> None:
    truth = standard(name)
    buffer = io.BytesIO()
    truth.image.save(buffer, "JPEG", quality=85)
    compressed = Image.open(io.BytesIO(buffer.getvalue()))
    alpha = alpha_of(remove_background(compressed).alpha)
    # Chroma subsampling smears colour edges by a few pixels: measured 0.999 and 0.997.
    assert iou(alpha > 0.5, truth.alpha > 0.5) >= 0.98


def test_coloured_backdrop() -> None:
    truth = scene("bag", (60, 60, 200), backdrop=(200, 205, 215), seed=10)
    alpha = alpha_of(remove_background(truth.image).alpha)
    assert iou(alpha > 0.5, truth.alpha > 0.5) >= MIN_IOU


# --- composites --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["navy-shirt", "grey-trousers", "pale-shirt"])
def test_white_composite(name: str) -> None:
    truth = standard(name)
    result = remove_background(truth.image, background="white")
    assert result.image.mode == "RGB"
    assert result.image.size == truth.image.size
    out = np.asarray(result.image)
    assert (out[far_from_garment(truth)] == 255).all()
    # Inside the garment the photo is untouched (where a low-contrast edge was cut a
    # pixel or two short, feathering reaches a few pixels in).
    inside = deep_inside(truth)
    diff = np.abs(out[inside].astype(np.int16) - np.asarray(truth.image)[inside]).max(axis=1)
    assert (diff <= 1).mean() >= 0.999


def test_transparent_output() -> None:
    truth = standard("striped-dress")
    result = remove_background(truth.image, background="transparent")
    assert result.image.mode == "RGBA"
    assert result.alpha.mode == "L"
    rgba = np.asarray(result.image)
    assert (rgba[..., 3][far_from_garment(truth)] == 0).all()
    assert (rgba[..., 3][deep_inside(truth)] == 255).all()
    assert np.array_equal(rgba[..., 3], np.asarray(result.alpha))


def test_decontamination_removes_backdrop_spill() -> None:
    # A red bag on a blue-grey backdrop: without decontamination the edge pixels keep a
    # blue cast, which shows as a halo on white.
    truth = scene("bag", (200, 30, 40), backdrop=(170, 190, 225), seed=21)
    a = truth.alpha[:, :, None]
    ideal = a * truth.foreground + (1 - a) * 255.0
    edge = (truth.alpha > 0.02) & (truth.alpha < 0.98)

    def edge_error(decontaminate: bool) -> float:
        result = remove_background(truth.image, feather_px=0, decontaminate=decontaminate)
        out = np.asarray(result.image, dtype=np.float32)
        return float(np.abs(out - ideal)[edge].mean())

    # Measured: about 1.5 with decontamination, about 21 without.
    cleaned, plain = edge_error(True), edge_error(False)
    assert cleaned < 5.0
    assert cleaned < 0.3 * plain


# --- report and behaviour ----------------------------------------------------------------


def test_report() -> None:
    truth = standard("navy-shirt")
    report = remove_background(truth.image).report
    expected_backdrop = np.median(truth.backdrop.reshape(-1, 3), axis=0)
    assert np.abs(np.asarray(report["backdrop_rgb"]) - expected_backdrop).max() < 2.0
    assert report["noise"] == pytest.approx(truth.noise_sigma, rel=0.15)
    assert report["foreground_fraction"] == pytest.approx(
        float((truth.alpha > 0.5).mean()), abs=0.005
    )
    assert report["frame_contact"] == 0.0
    assert report["components"] == 1
    assert report["threshold"] > 0
    assert report["backdrop_spread"] > 10


def test_report_notes_a_garment_cut_off_by_the_frame() -> None:
    report = remove_background(standard("grey-trousers").image).report
    assert 0.05 < report["frame_contact"] < 0.2


def test_is_deterministic() -> None:
    truth = standard("striped-dress")
    first = remove_background(truth.image, background="transparent")
    second = remove_background(truth.image, background="transparent")
    assert first.image.tobytes() == second.image.tobytes()
    assert first.report == second.report


def test_plain_backdrop_has_no_foreground() -> None:
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 2.0, (200, 300, 3))
    plain = Image.fromarray(np.clip(235 + noise, 0, 255).astype(np.uint8))
    result = remove_background(plain)
    assert result.report["foreground_fraction"] == 0.0
    assert (np.asarray(result.image) == 255).all()


def test_threshold_override() -> None:
    truth = standard("navy-shirt")
    assert remove_background(truth.image, threshold=500.0).report["foreground_fraction"] == 0.0
    tight = remove_background(truth.image, threshold=60.0)
    assert tight.report["threshold"] == 60.0
    assert iou(alpha_of(tight.alpha) > 0.5, truth.alpha > 0.5) >= MIN_IOU


def test_existing_transparency_is_respected() -> None:
    truth = standard("navy-shirt")
    rgba = truth.image.convert("RGBA")
    cut = np.asarray(rgba).copy()
    cut[:, : rgba.width // 2, 3] = 0
    result = remove_background(Image.fromarray(cut), background="transparent")
    assert (np.asarray(result.alpha)[:, : rgba.width // 2] == 0).all()


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (40, 5), (5, 40)])
def test_tiny_images(size: tuple[int, int]) -> None:
    result = remove_background(Image.new("RGB", size, (230, 230, 230)))
    assert result.image.size == size


def test_greyscale_input() -> None:
    truth = standard("green-bag")
    alpha = alpha_of(remove_background(truth.image.convert("L")).alpha)
    assert iou(alpha > 0.5, truth.alpha > 0.5) >= MIN_IOU


@pytest.mark.parametrize(
    "kwargs",
    [{"feather_px": -1.0}, {"threshold": 0.0}, {"background": "black"}],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs)))):
        remove_background(Image.new("RGB", (8, 8)), **kwargs)  # type: ignore[arg-type]


def test_a_1024_square_image_is_quick() -> None:
    image = scene("shirt", (120, 30, 30), width=1024, height=1024, seed=12).image
    remove_background(image)
    started = time.perf_counter()
    remove_background(image)
    # About 0.2-0.3 s on one core; the bound only catches pathological slowdowns.
    assert time.perf_counter() - started < 5.0


def _flood_components(mask: np.ndarray, eight: bool) -> list[int]:
    """Component areas by breadth-first search, the slow obvious way."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx)]
    if not eight:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    areas = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, area = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            area += 1
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        areas.append(area)
    return sorted(areas)


@pytest.mark.parametrize("eight", [True, False])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.6])
def test_connected_components_match_a_flood_fill(eight: bool, density: float) -> None:
    rng = np.random.default_rng(int(density * 10) + eight)
    mask = rng.random((60, 70)) < density
    runs = _components(mask, eight=eight)
    assert sorted(runs.area.tolist()) == _flood_components(mask, eight)
    assert runs.count == len(_flood_components(mask, eight))


# --- resize ------------------------------------------------------------------------------


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, y + 0 * x, 128 + 0 * x * y], axis=2).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(
    ("source", "box", "expected"),
    [
        ((400, 200), (100, 100), (100, 50)),  # landscape
        ((200, 400), (100, 100), (50, 100)),  # portrait
        ((400, 200), (300, 50), (100, 50)),  # height binds
        ((1234, 567), (300, 300), (300, 138)),
    ],
)
def test_fit(source: tuple[int, int], box: tuple[int, int], expected: tuple[int, int]) -> None:
    out = resize(gradient(*source), width=box[0], height=box[1], mode="fit")
    assert out.size == expected
    assert abs(out.width / out.height - source[0] / source[1]) * out.height <= 1.0


def test_fit_pads_to_the_box_when_given_a_background() -> None:
    out = resize(
        Image.new("RGB", (400, 200), (0, 0, 0)),
        width=100,
        height=100,
        mode="fit",
        background=(255, 255, 255),
    )
    assert out.size == (100, 100)
    pixels = np.asarray(out)
    assert (pixels[:25] == 255).all()
    assert (pixels[75:] == 255).all()
    assert (pixels[26:74] == 0).all()


def test_fit_padding_of_a_cut_out_stays_transparent() -> None:
    cut_out = Image.new("RGBA", (200, 400), (200, 20, 20, 255))
    out = resize(cut_out, width=100, height=100, mode="fit", background=(255, 255, 255))
    assert (out.mode, out.size) == ("RGBA", (100, 100))
    alpha = np.asarray(out)[..., 3]
    assert (alpha[:, :25] == 0).all()
    assert (alpha[:, 75:] == 0).all()
    assert (alpha[:, 26:74] == 255).all()


@pytest.mark.parametrize(("source", "box"), [((400, 200), (100, 100)), ((200, 400), (120, 80))])
def test_fill_covers_the_box_and_crops_the_centre(
    source: tuple[int, int], box: tuple[int, int]
) -> None:
    w, h = source
    image = Image.new("RGB", source, (0, 0, 255))
    # A green square at the centre, red strips at all four edges (some are cropped away).
    image.paste((0, 255, 0), (w // 2 - 10, h // 2 - 10, w // 2 + 10, h // 2 + 10))
    for strip in ((0, 0, 4, h), (w - 4, 0, w, h), (0, 0, w, 4), (0, h - 4, w, h)):
        image.paste((255, 0, 0), strip)
    out = resize(image, width=box[0], height=box[1], mode="fill")
    assert out.size == box
    pixels = np.asarray(out).astype(np.int16)
    assert np.abs(pixels[box[1] // 2, box[0] // 2] - (0, 255, 0)).max() < 10
    green = np.argwhere((pixels[..., 1] > 200) & (pixels[..., 0] < 50))
    centre = green.mean(axis=0)
    assert np.abs(centre - ((box[1] - 1) / 2, (box[0] - 1) / 2)).max() <= 1.0


def test_fill_crops_only_the_overflowing_axis() -> None:
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 400, 4))  # top strip: must survive
    image.paste((255, 0, 0), (0, 0, 4, 200))  # left strip: cropped away
    out = np.asarray(resize(image, width=100, height=100, mode="fill")).astype(np.int16)
    assert out[0, 50, 0] > 150
    assert out[50, 0, 0] < 30


@pytest.mark.parametrize(
    ("source", "box"),
    [((1280, 896), (300, 300)), ((1280, 896), (150, 150)), ((640, 480), (97, 131))],
)
def test_fill_where_the_fitting_side_rounds_past_the_image(
    source: tuple[int, int], box: tuple[int, int]
) -> None:
    # box / scale gives back the fitting side a last bit too long for these: the crop
    # box then started a hair above the image and Pillow refused it.
    out = resize(gradient(*source), width=box[0], height=box[1], mode="fill")
    assert out.size == box


@pytest.mark.parametrize("source", [(1280, 896), (1000, 750), (800, 1200), (333, 777), (999, 1000)])
def test_fill_takes_any_box(source: tuple[int, int]) -> None:
    image = gradient(*source)
    for box in [(300, 300), (512, 512), (200, 100), (100, 200), (150, 150), (250, 333), (97, 131)]:
        assert resize(image, width=box[0], height=box[1], mode="fill").size == box


def test_exact_stretches() -> None:
    out = resize(gradient(400, 200), width=123, height=321, mode="exact")
    assert out.size == (123, 321)


@pytest.mark.parametrize("mode", ["fit", "fill", "exact"])
def test_one_side_only_keeps_the_aspect_ratio(mode: str) -> None:
    by_width = resize(gradient(400, 300), width=200, height=None, mode=mode)  # type: ignore[arg-type]
    assert by_width.size == (200, 150)
    by_height = resize(gradient(300, 400), width=None, height=100, mode=mode)  # type: ignore[arg-type]
    assert by_height.size == (75, 100)


def test_alpha_is_kept_without_dark_fringes() -> None:
    image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 100, 200))
    out = resize(image, width=77, height=77, mode="exact")
    assert out.mode == "RGBA"
    pixels = np.asarray(out)
    assert pixels[38, 10, 3] == 255
    assert pixels[38, 70, 3] == 0
    # Edge pixels are partly transparent but keep their colour: resampling premultiplies.
    edge = pixels[:, 36:42]
    partial = (edge[..., 3] > 10) & (edge[..., 3] < 245)
    assert partial.any()
    assert (edge[..., 0][partial] > 240).all()


def test_palette_and_greyscale_images() -> None:
    assert resize(gradient(64, 64, "P"), width=32, height=32, mode="fit").size == (32, 32)
    assert resize(gradient(64, 64, "L"), width=32, height=32, mode="fit").mode == "L"


@pytest.mark.parametrize(
    ("source", "width", "height", "mode", "message"),
    [
        ((100, 100), 401, 401, "fit", "enlarge"),
        ((100, 100), 401, None, "exact", "enlarge"),
        ((100, 50), 100, 250, "fill", "enlarge"),
        ((2000, 1000), 7000, 1000, "exact", "6000"),
        ((1600, 1600), 6400, None, "fit", "6000"),
        ((100, 100), None, None, "fit", "width"),
        ((100, 100), 0, 10, "fit", "at least 1"),
        ((100, 100), 10, 10, "stretch", "mode"),
    ],
)
def test_refused_resizes(
    source: tuple[int, int], width: int | None, height: int | None, mode: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resize(gradient(*source), width=width, height=height, mode=mode)  # type: ignore[arg-type]


def test_four_times_is_the_largest_enlargement() -> None:
    assert resize(gradient(100, 50), width=400, height=200, mode="exact").size == (400, 200)


def test_large_reduction_is_quick() -> None:
    image = Image.new("RGB", (6000, 4000), (40, 90, 160))
    started = time.perf_counter()
    out = resize(image, width=1024, height=1024, mode="fit")
    assert out.size == (1024, 683)
    assert time.perf_counter() - started < 5.0


def textured(width: int, height: int, mode: str = "RGB", seed: int = 5) -> Image.Image:
    """Gradients and noise: every output row of a Lanczos pass depends on its source rows."""
    rng = np.random.default_rng(seed)
    base = np.asarray(gradient(width, height), dtype=np.float32)
    noise = rng.normal(0, 12.0, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).convert(mode)


def pillow_resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes Pillow's resize is called for from now on."""
    calls: list[tuple[int, int]] = []
    real = Image.Image.resize

    def counted(
        self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object
    ) -> object:
        calls.append(size)
        return real(self, size, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "resize", counted)
    return calls


@pytest.fixture
def pillow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resize as a platform without libvips does: every pass Pillow's."""
    monkeypatch.setattr(resize_module, "_libvips", lambda: None)


@pytest.mark.usefixtures("pillow_only")
@pytest.mark.parametrize(
    ("source", "size", "box"),
    [
        ((1024, 1024), (512, 512), None),  # a binary scale: every row as Pillow writes it
        ((999, 777), (512, 398), None),
        ((4000, 3000), (512, 384), None),  # an integer reduction first
        ((3000, 2000), (512, 512), (500.0, 0.0, 2500.0, 2000.0)),  # fill's crop box
        ((300, 200), (1200, 800), None),  # an enlargement
        ((3000, 2000), (1024, 683), None),
        ((1024, 1024), (683, 683), None),  # no whole-row split: one pass
        ((2999, 2001), (700, 467), (3.5, 1.25, 2990.0, 2000.0)),
        ((5000, 3000), (300, 200), (100.3, 50.7, 4900.1, 2950.2)),
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_banded_resampling_writes_pillows_single_pass_exactly(
    source: tuple[int, int],
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None,
    mode: str,
) -> None:
    image = textured(*source, mode=mode)
    image.info["icc_profile"] = b"profile"
    expected = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    banded = resize_module._lanczos(image, size, box)
    assert banded.size == size and banded.mode == mode
    assert banded.info.get("icc_profile") == b"profile"
    assert np.array_equal(np.asarray(banded), np.asarray(expected))


@pytest.mark.usefixtures("pillow_only")
def test_short_outputs_are_one_pass_and_tall_ones_two_bands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = pillow_resizes(monkeypatch)
    resize(textured(400, 400), width=100, height=100, mode="exact")
    assert calls == [(100, 100)]
    calls.clear()
    resize(textured(1024, 1024), width=512, height=512, mode="fit")
    assert sorted(calls) == [(512, 256), (512, 256)]
    calls.clear()
    resize(textured(2000, 3000), width=1024, height=1024, mode="fit")  # 3000 → 1024: 128k rows
    assert sorted(calls) == [(683, 512), (683, 512)]
    calls.clear()
    resize(textured(1024, 1024), width=683, height=683, mode="fit")
    assert calls == [(683, 683)]
    calls.clear()
    same = textured(300, 200)
    kept = resize(same, width=300, height=None, mode="fit")
    assert np.array_equal(np.asarray(kept), np.asarray(same))
    assert calls == []


def cut_out(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode``; with alpha, a ramp from clear to opaque crossed by fully clear
    stripes whose hidden colour is the image's inverse, which must not bleed into the rest."""
    out = image.convert(mode)
    if mode in ("RGBA", "LA"):
        w, h = out.size
        alpha = np.add.outer(np.arange(h), np.arange(w)) * 255 // max(1, w + h - 2)
        clear = (np.arange(w) // max(1, w // 16)) % 3 == 0
        alpha[:, clear] = 0
        pixels = np.asarray(out).copy()
        pixels[:, clear, :-1] = 255 - pixels[:, clear, :-1]
        pixels[..., -1] = alpha
        out = Image.fromarray(pixels.astype(np.uint8), mode)
    return out


def lanczos3(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The exact Lanczos 3 reduction in float64 (Pillow's pixel centres, weights normalised
    at the edges), clipped to 0..255 but not rounded: what both libraries approximate."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        support = 3.0 * max(scale, 1.0)
        out = np.zeros((n_out, n_in))
        for i in range(n_out):
            centre = (i + 0.5) * scale
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            x = (np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0)
            w = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
            out[i, lo:hi] = w / w.sum()
        return out

    data = pixels.astype(np.float64).reshape(pixels.shape[0], pixels.shape[1], -1)
    rows = np.einsum("ij,jkc->ikc", weights(data.shape[0], size[1]), data)
    both = np.einsum("kj,ijc->ikc", weights(data.shape[1], size[0]), rows)
    return np.clip(both, 0, 255).reshape((size[1], size[0], *pixels.shape[2:]))


@pytest.mark.parametrize(
    ("source", "size"),
    [
        ((1024, 1024), (512, 512)),
        ((999, 777), (512, 398)),
        ((1024, 1024), (1000, 1000)),  # a slight reduction
        ((1024, 768), (1024, 300)),  # one side only
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_whole_image_reductions_are_libvips_and_as_exact_as_pillow(
    source: tuple[int, int], size: tuple[int, int], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = textured(*source, mode=mode)
    image.info["icc_profile"] = b"profile"
    expected = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    calls = pillow_resizes(monkeypatch)
    out = resize_module._lanczos(image, size)
    assert calls == []  # no Pillow pass
    assert out.size == size and out.mode == mode
    assert out.info.get("icc_profile") == b"profile"
    # Both round to 8 bits between their two passes, so neither is the exact result; libvips
    # must be as near it as Pillow is. The outermost pixels are left out: the libraries
    # extend the image differently past its edge.
    exact = lanczos3(np.asarray(image), size)[4:-4, 4:-4]

    def error(im: Image.Image) -> tuple[float, float]:
        e = np.asarray(im, dtype=np.float64)[4:-4, 4:-4] - exact
        return float(np.abs(e).max()), float(np.sqrt((e**2).mean()))

    (ours_max, ours_rms), (pillow_max, pillow_rms) = error(out), error(expected)
    assert ours_rms <= 1.15 * pillow_rms + 0.02, (ours_rms, pillow_rms)
    assert ours_max <= pillow_max + 1.5, (ours_max, pillow_max)


@pytest.mark.parametrize(
    ("source", "size"),
    [
        ((1024, 1024), (512, 512)),
        ((4000, 3000), (512, 384)),  # past the reducing gap: a box shrink first
        ((3000, 2000), (1024, 683)),
        ((5, 3), (1, 1)),
    ],
)
@pytest.mark.parametrize("mode", ["RGBA", "LA", "RGB"])
def test_reductions_with_alpha_are_premultiplied_as_pillows(
    source: tuple[int, int], size: tuple[int, int], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = cut_out(textured(*source), mode)
    expected = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    calls = pillow_resizes(monkeypatch)
    out = resize_module._lanczos(image, size)
    assert calls == []
    assert out.size == size and out.mode == mode
    # What is composited, colour times alpha, and the alpha itself: without premultiplying,
    # the clear side's colour would bleed into the opaque one and these would differ widely.
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(mode, mode)
    ours = np.asarray(out.convert(premultiplied), dtype=np.int16)
    theirs = np.asarray(expected.convert(premultiplied), dtype=np.int16)
    diff = np.abs(ours - theirs)
    if min(size) >= 8:
        assert diff.max() <= 4, diff.max()
        assert diff.mean() < 0.75, diff.mean()
    else:  # all edge: the libraries extend the image past it differently
        assert diff.max() <= 8, diff.max()


@pytest.mark.parametrize(
    ("source", "size", "box"),
    [
        ((300, 200), (1200, 800), None),  # an enlargement
        ((1024, 768), (2048, 300), None),  # wider, though shorter
        ((3000, 2000), (512, 512), (500.0, 0.0, 2500.0, 2000.0)),  # fill's crop box
    ],
)
def test_enlargements_and_crops_stay_with_pillow(
    source: tuple[int, int],
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = textured(*source)
    expected = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    calls = pillow_resizes(monkeypatch)
    out = resize_module._lanczos(image, size, box)
    assert calls and all(w == size[0] for w, _ in calls)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_a_reduction_libvips_refuses_is_pillows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vips = resize_module._libvips()

    def refuse(self: object, *args: object, **kwargs: object) -> object:
        raise vips.Error("out of order")

    monkeypatch.setattr(vips.Image, "resize", refuse)
    image = textured(1024, 1024)
    expected = image.resize((512, 512), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = resize(image, width=512, height=512, mode="fit")
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert "libvips could not reduce RGB (1024, 1024) to (512, 512)" in caplog.text


def test_a_reduction_logs_nothing_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    resize(textured(1024, 1024), width=384, height=384, mode="fit")
    assert resize_module._libvips() is not None
    assert [r.getMessage() for r in caplog.records] == []


def test_other_modes_stay_with_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    image = textured(400, 300).convert("I")
    calls = pillow_resizes(monkeypatch)
    assert resize_module._lanczos(image, (200, 150)).mode == "I"
    assert calls and all(w == 200 for w, _ in calls)


def test_libvips_is_not_loaded_until_a_resize_needs_it() -> None:
    # A Celery worker imports its tasks before it forks its pool, and libvips' threads do not
    # survive a fork: loading it there would hang the pool's first resize.
    code = (
        "import sys, workers.celery_app, workers.executors, workers.pipelines.resize as r\n"
        "from PIL import Image\n"
        "assert 'pyvips' not in sys.modules, 'loaded on import'\n"
        "r.resize(Image.new('RGB', (64, 64)), width=32, height=32, mode='fit')\n"
        "assert 'pyvips' in sys.modules, 'not used for a reduction'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
