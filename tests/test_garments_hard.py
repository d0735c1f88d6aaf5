"""Sanity of the hard synthetic scenes: exact, consistent ground truth (not segmenter accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.garments import (
    HARD_SCENE_NOTES,
    HARD_SCENES,
    HEIGHT,
    WIDTH,
    Scene,
    delta_e,
    make_hard_scene,
    median_rgb,
    to_lab,
)
from workers.pipelines.ghost.segmentation import dilate, erode

BODY_PARTS = ("skin", "hair", "face", "trousers", "shoes", "mannequin", "stand", "hanger")
GARMENT_PARTS = ("print", "seam", "collar", "interior", "label")
BACKDROP_PARTS = ("floor", "shadow", "rail")
MODELS = ("model-skin-tones", "model-white-top", "model-skin-dress")
NO_BODY = ("ghost-already",)
NO_HIDDEN = ("ghost-already", "busy-scene")

_cache: dict[tuple[str, int], Scene] = {}


def scene(name: str, seed: int = 0) -> Scene:
    if (name, seed) not in _cache:
        _cache[name, seed] = make_hard_scene(name, seed=seed)
    return _cache[name, seed]


def _mask(s: Scene, key: str) -> np.ndarray:
    m = s.extras[key]
    assert isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (HEIGHT, WIDTH)
    return m


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", HARD_SCENES)
def test_masks_partition_the_frame(name: str, seed: int) -> None:
    s = scene(name, seed)
    assert s.image.shape == (HEIGHT, WIDTH, 3) and s.image.dtype == np.uint8
    total = s.backdrop.astype(int) + s.garment.astype(int) + s.body.astype(int)
    assert (total == 1).all()
    assert s.garment.mean() > 0.1
    assert s.backdrop.mean() > 0.2
    if name in NO_BODY:
        assert not s.body.any()
    else:
        assert s.body.sum() > 300


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", HARD_SCENES)
def test_extras_lie_inside_their_class(name: str, seed: int) -> None:
    s = scene(name, seed)
    assert s.extras["name"] == name and s.extras["seed"] == seed
    assert s.extras["refuse"] is (name == "busy-scene")
    for key, inside in [
        *((k, s.body) for k in BODY_PARTS),
        *((k, s.garment) for k in GARMENT_PARTS),
        *((k, s.backdrop) for k in BACKDROP_PARTS),
    ]:
        if key in s.extras:
            m = _mask(s, key)
            assert m.any(), key
            assert not (m & ~inside).any(), key


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", HARD_SCENES)
def test_hidden_regions_are_outside_the_garment(name: str, seed: int) -> None:
    s = scene(name, seed)
    for m in (s.neck, *s.sleeves, *s.hems):
        assert m.shape == (HEIGHT, WIDTH) and not (m & s.garment).any()
    if name in NO_HIDDEN:
        assert not s.hidden.any() and not s.sleeves and not s.hems
    else:
        assert s.neck.sum() > 300
        # The neck opening borders the garment.
        assert (dilate(s.neck, 2) & s.garment).any()


@pytest.mark.parametrize("name", HARD_SCENES)
def test_deterministic_per_seed_and_varies_with_it(name: str) -> None:
    a, b = make_hard_scene(name, seed=3), make_hard_scene(name, seed=3)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.garment, b.garment) and np.array_equal(a.body, b.body)
    c = make_hard_scene(name, seed=4)
    assert not np.array_equal(a.garment, c.garment)  # placement jitter
    diff = np.abs(a.image.astype(int) - c.image.astype(int)).mean()
    assert diff > 2.0


def test_every_scene_is_described_and_unknown_names_fail() -> None:
    assert set(HARD_SCENE_NOTES) == set(HARD_SCENES)
    with pytest.raises(ValueError, match="unknown hard scene"):
        make_hard_scene("nope")


@pytest.mark.parametrize("name", MODELS)
def test_models_show_skin_hair_and_face(name: str) -> None:
    s = scene(name)
    skin, hair = _mask(s, "skin"), _mask(s, "hair")
    assert skin.sum() > 3000 and hair.sum() > 400 and _mask(s, "face").any()
    # Skin is shaded, not flat.
    lum = s.image[erode(skin, 1)].astype(float).mean(axis=1)
    assert lum.std() > 6.0


def test_skin_tones_run_light_to_dark_and_hair_on_the_shoulders() -> None:
    lightness = []
    for seed in range(5):
        s = scene("model-skin-tones", seed)
        rgb = s.extras["skin_rgb"]
        assert isinstance(rgb, tuple)
        lightness.append(float(to_lab(rgb)[0]))
        hair = _mask(s, "hair")
        top = int(np.flatnonzero(s.garment.any(axis=1))[0])
        assert hair[top + 10 :].sum() > 200  # locks fall over the garment's shoulders
    assert max(lightness) - min(lightness) > 30.0


def _ring(m: np.ndarray, r: int = 15) -> np.ndarray:
    return np.asarray(dilate(m, r) & ~m)


@pytest.mark.parametrize(
    ("name", "part", "against", "lo", "hi"),
    [
        ("model-white-top", "garment", "backdrop", 4.0, 11.0),
        ("model-skin-dress", "garment", "skin", 9.0, 16.0),
        ("cream-on-cream", "garment", "mannequin", 7.0, 13.0),
        ("white-on-white", "garment", "backdrop", 1.5, 8.0),
        ("printed-logo", "print", "backdrop", 0.0, 6.0),
    ],
)
def test_close_colours_are_as_close_as_advertised(
    name: str, part: str, against: str, lo: float, hi: float
) -> None:
    for seed in (0, 1, 2):
        s = scene(name, seed)
        a = erode(s.garment, 2) if part == "garment" else _mask(s, part)
        b = s.backdrop & _ring(s.garment) if against == "backdrop" else _mask(s, against)
        de = delta_e(median_rgb(s.image, a), median_rgb(s.image, b))
        assert lo <= de <= hi, (seed, de)


def test_printed_logo_print_is_large_and_reaches_the_silhouette() -> None:
    s = scene("printed-logo")
    p = _mask(s, "print")
    assert p.sum() > 0.1 * s.garment.sum()
    # The band and stripes meet the backdrop at the garment's edge.
    assert (dilate(p, 2) & s.backdrop).sum() > 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frame_crossing_touches_three_borders(seed: int) -> None:
    s = scene("frame-crossing", seed)
    g = s.garment
    assert g[:, 0].sum() > 40 and g[:, -1].sum() > 40 and g[-1].sum() > 100
    assert not g[0].any()
    assert not s.sleeves and not s.hems  # the openings are out of frame


@pytest.mark.parametrize("seed", [0, 1])
def test_floor_corner_has_a_floor_below_the_horizon(seed: int) -> None:
    s = scene("floor-corner", seed)
    horizon = s.extras["horizon_y"]
    assert isinstance(horizon, float) and 0.75 * HEIGHT <= horizon <= 0.85 * HEIGHT
    floor = _mask(s, "floor")
    assert floor.sum() > 0.1 * WIDTH * HEIGHT
    assert not floor[: int(horizon) - 1].any()
    assert _mask(s, "shadow").any()
    # The dress's hem and the stand reach below the horizon.
    assert s.garment[int(horizon) :].any() or s.body[int(horizon) :].any()


def test_ghost_already_shows_the_inside_and_no_body() -> None:
    s = scene("ghost-already")
    interior = _mask(s, "interior")
    assert interior.sum() > 300
    inner = median_rgb(s.image, erode(interior, 1) & ~_mask(s, "label"))
    outer = median_rgb(s.image, erode(s.garment & ~dilate(interior, 3), 2))
    assert sum(inner) < 0.85 * sum(outer)  # the inside is in shadow


def test_busy_scene_is_marked_for_refusal() -> None:
    s = scene("busy-scene")
    assert s.extras["refuse"] is True
    # Not a plain backdrop: the background varies strongly.
    assert s.image[s.backdrop].astype(float).std(axis=0).mean() > 30.0
