"""Plain PNGs read by libvips as it reduces them (hiddenmodel.images.PlainPng).

A resize of an 8-bit RGB PNG that decode_image returns exactly as stored skips Pillow's
decode: libvips reads the stored copy and reduces it in one pass. What must hold: only such
PNGs take that way, every check of decode_image still runs, and the result is the very
image the decode-then-resize way gives, whatever the mode and size.
"""

from __future__ import annotations

import hashlib
import io
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from hiddenmodel import storage
from hiddenmodel.images import (
    ImageLimits,
    ImageRejected,
    PlainPng,
    decode_image,
    decode_image_or_plain_png,
)
from tests.conftest import db_rows
from tests.factories import keyed_org, submit
from tests.imagegen import interlaced_png, png16_rgb, png_chunk
from workers import runner
from workers.pipelines import resize as resize_module
from workers.pipelines.resize import resize


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([30 + 0.5 * x, 60 + 0.4 * y, 200 - 0.1 * (x + y)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def _png(image: Image.Image, **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save)
    return out.getvalue()


def _with_chunk(data: bytes, kind: bytes, body: bytes, *, after_image: bool = False) -> bytes:
    """``data`` with one more chunk: just after IHDR, or just before IEND."""
    at = len(data) - 12 if after_image else 33
    return data[:at] + png_chunk(kind, body) + data[at:]


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _xmp(orientation: int) -> PngInfo:
    info = PngInfo()
    info.add_itxt(
        "XML:com.adobe.xmp",
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>',
    )
    return info


RGB = _photo(90, 70, seed=1)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
_PIXELS = np.asarray(RGB)

PLAIN: dict[str, bytes] = {
    "rgb": _png(RGB),
    "rgb compressed hard": _png(RGB, compress_level=9),
    "rgb with text before and after the image data": _with_chunk(
        _with_chunk(_png(RGB), b"tEXt", b"Comment\0made here"),
        b"iTXt",
        b"Description\0\0\0\0\0a shirt",
        after_image=True,
    ),
    "rgb with an ICC profile": _png(RGB, icc_profile=SRGB),
    "rgb with a resolution": _png(RGB, dpi=(300, 300)),
}
NOT_PLAIN: dict[str, bytes] = {
    "rgba": _png(RGB.convert("RGBA")),
    "rgb with a transparent colour": _png(RGB, transparency=(30, 60, 200)),
    "16-bit rgb": png16_rgb(_PIXELS.astype(np.uint16) * 257),
    "interlaced": interlaced_png(_PIXELS),
    "grey": _png(RGB.convert("L")),
    "palette": _png(RGB.convert("P")),
    "eXIf turned": _png(RGB, exif=_exif(6)),
    "eXIf after the image data, turned": _with_chunk(
        _png(RGB), b"eXIf", _exif(6).removeprefix(b"Exif\0\0"), after_image=True
    ),
    "XMP turned": _png(RGB, pnginfo=_xmp(8)),
    "EXIF written as text": _with_chunk(
        _png(RGB),
        b"zTXt",
        b"Raw profile type exif\0\0" + zlib.compress(b"\nexif\n      0\n"),
    ),
    "jpeg": (lambda out: (RGB.save(out, "JPEG"), out.getvalue())[1])(io.BytesIO()),
}


def _same(a: Image.Image, b: Image.Image) -> None:
    assert (a.mode, a.size) == (b.mode, b.size)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.info == b.info


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_a_plain_png_is_left_undecoded_and_decodes_as_decode_image_does(name: str) -> None:
    data = PLAIN[name]
    plain = decode_image_or_plain_png(data)
    assert isinstance(plain, PlainPng), name
    assert (plain.size, plain.mode) == (RGB.size, "RGB")
    _same(plain.decode(), decode_image(data))
    assert ("icc_profile" in plain.info) == (name == "rgb with an ICC profile")


@pytest.mark.parametrize("name", sorted(NOT_PLAIN))
def test_anything_else_is_decoded_as_before(name: str) -> None:
    data = NOT_PLAIN[name]
    decoded = decode_image_or_plain_png(data)
    assert isinstance(decoded, Image.Image), name
    _same(decoded, decode_image(data))


def test_an_orientation_is_still_applied() -> None:
    for name in ("eXIf turned", "eXIf after the image data, turned", "XMP turned"):
        decoded = decode_image_or_plain_png(NOT_PLAIN[name])
        assert isinstance(decoded, Image.Image)
        assert decoded.size == (70, 90), name


RESIZES: list[tuple[str, int | None, int | None, tuple[int, int, int] | None]] = [
    ("fit", 45, 45, None),
    ("fit", 64, 64, (255, 255, 255)),
    ("fit", 30, None, None),
    ("fill", 40, 40, None),
    ("exact", 33, 61, None),
    ("exact", 90, 70, None),  # the same size: a copy
    ("fit", 200, 200, None),  # an enlargement: Pillow's
]


@pytest.mark.parametrize("name", [*sorted(PLAIN), "rgba", "eXIf turned"])
@pytest.mark.parametrize(("mode", "width", "height", "background"), RESIZES)
def test_a_resize_gives_the_same_image_either_way(
    name: str,
    mode: Any,
    width: int | None,
    height: int | None,
    background: tuple[int, int, int] | None,
) -> None:
    data = PLAIN.get(name) or NOT_PLAIN[name]
    expected = resize(
        decode_image(data), width=width, height=height, mode=mode, background=background
    )
    got = resize(
        decode_image_or_plain_png(data),
        width=width,
        height=height,
        mode=mode,
        background=background,
    )
    _same(got, expected)


def test_a_large_photo_is_the_same_either_way() -> None:
    data = _png(_photo(1024, 768, seed=7))
    plain = decode_image_or_plain_png(data, validated_sha256=hashlib.sha256(data).hexdigest())
    assert isinstance(plain, PlainPng)
    for size in ((512, 512), (300, 300), (1000, 100)):
        _same(
            resize(plain, width=size[0], height=size[1], mode="fit"),
            resize(decode_image(data), width=size[0], height=size[1], mode="fit"),
        )


def test_a_reduction_reads_the_png_with_libvips_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = decode_image_or_plain_png(PLAIN["rgb"])
    assert isinstance(plain, PlainPng)

    def no_decode(self: PlainPng) -> Image.Image:
        raise AssertionError("decoded by Pillow")

    monkeypatch.setattr(PlainPng, "decode", no_decode)
    assert resize(plain, width=45, height=45, mode="fit").size == (45, 35)
    with pytest.raises(AssertionError, match="decoded by Pillow"):
        resize(plain, width=40, height=40, mode="fill")  # a crop: Pillow's way


def test_without_libvips_the_png_is_decoded_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    data = PLAIN["rgb"]
    expected = resize(decode_image(data), width=45, height=45, mode="fit")
    monkeypatch.setattr(resize_module, "_libvips", lambda: None)
    got = resize(decode_image_or_plain_png(data), width=45, height=45, mode="fit")
    assert got.size == expected.size  # Pillow's Lanczos: within a level or two
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= 3


def test_every_check_still_runs() -> None:
    data = PLAIN["rgb"]
    small = ImageLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageRejected) as too_large:
        decode_image_or_plain_png(data, small)
    assert too_large.value.kind == "image-too-large"
    with pytest.raises(ImageRejected) as too_wide:
        decode_image_or_plain_png(data, ImageLimits(max_side=80))
    assert too_wide.value.kind == "image-dimensions-too-large"
    damaged = bytearray(data)
    damaged[40] ^= 0xFF  # inside the image data: its CRC no longer matches
    with pytest.raises(ImageRejected) as crc:
        decode_image_or_plain_png(bytes(damaged))
    assert crc.value.kind == "corrupt-image"
    with pytest.raises(ImageRejected) as unknown_filter:
        decode_image_or_plain_png(_rows(9))
    assert unknown_filter.value.kind == "corrupt-image"


def _rows(filter_type: int = 0, *, height: int | None = None) -> bytes:
    """PLAIN["rgb"]'s header with the first ``height`` of its rows (all by default), the first
    with the filter byte ``filter_type`` (CRC and zlib valid)."""
    raw = RGB.tobytes()
    stride = 3 * RGB.width
    rows = b"".join(
        bytes([filter_type if y == 0 else 0]) + raw[y * stride : (y + 1) * stride]
        for y in range(RGB.height if height is None else height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + PLAIN["rgb"][8:33]
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def _flipped(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    return bytes(damaged)


_TEXT_AFTER = PLAIN["rgb with text before and after the image data"]
DAMAGED: dict[str, bytes] = {
    "image data": _flipped(PLAIN["rgb"], len(PLAIN["rgb"]) // 2),
    "a text chunk after the image data": _flipped(_TEXT_AFTER, len(_TEXT_AFTER) - 16),
    "no end marker": _TEXT_AFTER[:-12],
    "rows missing from the stream": _rows(height=RGB.height - 3),
    "a row with an unknown filter": _rows(9),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_pngs_are_refused_and_never_come_back_plain(name: str) -> None:
    """Without the walk's digest the walk refuses them. With it (bytes that somehow changed
    after a validation that could not have passed them), the stored copy's own checks keep
    them off libvips' way all the same; a row with an unknown filter is refused by the
    decode, which Pillow would otherwise fill in or misread."""
    bad = DAMAGED[name]
    with pytest.raises(ImageRejected) as refused:
        decode_image_or_plain_png(bad)
    assert refused.value.kind == "corrupt-image"
    digest = hashlib.sha256(bad).hexdigest()
    trusted: object
    try:
        trusted = decode_image_or_plain_png(bad, validated_sha256=digest)
    except ImageRejected as exc:
        trusted = exc.kind
    assert not isinstance(trusted, PlainPng)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_a_plain_png_spends_neither_the_walk_nor_the_digest(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stored copy checks all the walk would: neither the walk nor the SHA-256 that
    lets a validated upload skip it runs, and the image is still decode_image's."""
    from hiddenmodel import images

    def not_here(*_: Any, **__: Any) -> Any:
        raise AssertionError("a plain PNG needs no walk and no digest")

    expected = decode_image(PLAIN[name])
    monkeypatch.setattr(images, "_check_png_structure", not_here)
    monkeypatch.setattr(images, "_was_walked", not_here)
    plain = decode_image_or_plain_png(PLAIN[name])
    assert isinstance(plain, PlainPng)
    _same(plain.decode(), expected)


def _job_output(job_id: str) -> Image.Image:
    ((outputs,),) = db_rows("SELECT outputs FROM jobs WHERE id = :id", id=job_id)
    return Image.open(io.BytesIO(storage.get_object(outputs[0]["key"])))


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_resize_job_reads_a_plain_png_with_libvips(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker leaves a resize's plain PNG undecoded; its output is the image the
    decode-then-resize way gives. Other operations, and other PNGs, are decoded."""
    org, headers = await keyed_org(client)
    loaded: list[str] = []
    original: Callable[..., Any] = runner._load_inputs

    def spy(job: Any) -> Any:
        images, plain = original(job)
        assert not set(images) & set(plain)  # each input in one of the two, never both
        loaded.extend(f"{name}:{'plain' if name in plain else 'decoded'}" for name in job.inputs)
        return images, plain

    monkeypatch.setattr(runner, "_load_inputs", spy)
    photo = _png(_photo(640, 480, seed=3))
    cut_out = _png(_photo(640, 480, seed=3).convert("RGBA"))
    params = {"width": 320, "height": 320, "mode": "fit"}
    for image in (photo, cut_out):
        job_id = (await submit(client, headers, params=params, image=image)).json()["id"]
        assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "succeeded"
        expected = resize(decode_image(image), width=320, height=320, mode="fit")
        output = _job_output(job_id)
        assert output.size == expected.size == (320, 240)
        assert np.array_equal(np.asarray(output.convert(expected.mode)), np.asarray(expected))
    assert loaded == ["image:plain", "image:decoded"]
