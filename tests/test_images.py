"""Upload validation, decoding and encoding, on files generated in memory."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile
from PIL.PngImagePlugin import PngInfo

from hiddenmodel import images
from hiddenmodel.images import (
    DEFAULT_LIMITS,
    ImageInfo,
    ImageLimits,
    ImageRejected,
    PngCompression,
    content_type,
    decode_image,
    encode_image,
    inspect_image,
)
from tests.imagegen import (
    encode,
    interlaced_png,
    jpeg_with_size,
    png16_rgb,
    png_chunk,
    raw_png,
    scene,
)

MB = 1024 * 1024


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Noisy RGB content, so truncation hits real compressed data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def rejected(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        inspect_image(data, limits)
    # decode_image runs the same checks: a worker must refuse what the API refuses.
    with pytest.raises(ImageRejected) as again:
        decode_image(data, limits)
    assert again.value.kind == caught.value.kind
    return caught.value


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- accepted images ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "pillow_format", "mode"),
    [
        ("png", "PNG", "RGB"),
        ("jpeg", "JPEG", "RGB"),
        ("webp", "WEBP", "RGB"),
        ("png", "PNG", "RGBA"),
    ],
)
def test_accepts_supported_formats(fmt: str, pillow_format: str, mode: str) -> None:
    data = encode(photo().convert(mode), pillow_format)
    info = inspect_image(data)
    assert info == ImageInfo(
        format=fmt,  # type: ignore[arg-type]
        width=96,
        height=64,
        mode=mode,
        has_alpha=mode == "RGBA",
        orientation=1,
    )
    decoded = decode_image(data)
    assert decoded.size == (96, 64)
    assert decoded.mode == mode


def test_default_limits_match_the_documented_ones() -> None:
    assert DEFAULT_LIMITS.max_bytes == 50 * MB
    assert DEFAULT_LIMITS.max_pixels == 40_000_000
    assert DEFAULT_LIMITS.max_side == 6000
    assert DEFAULT_LIMITS.allowed_formats == {"png", "jpeg", "webp"}


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="unsupported formats"):
        ImageLimits(allowed_formats=frozenset({"gif"}))  # type: ignore[arg-type]


# --- size and format ---------------------------------------------------------------------


def test_empty_file() -> None:
    error = rejected(b"")
    assert (error.kind, error.status) == ("empty-file", 422)


def test_too_many_bytes_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was parsed")

    monkeypatch.setattr(Image, "open", refuse)
    # 100 MB of zeros: bytes(n) maps zeroed pages lazily, so this costs no real memory.
    error = rejected(bytes(100 * MB))
    assert (error.kind, error.status) == ("image-too-large", 413)
    assert "104,857,600 bytes" in error.detail


def test_byte_limit_is_configurable() -> None:
    data = encode(photo(), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    assert rejected(data, limits).kind == "image-too-large"
    assert inspect_image(data, ImageLimits(max_bytes=len(data))).width == 96


def test_text_file_named_png_is_refused() -> None:
    # Only the content counts; whatever name it was uploaded under never reaches here.
    error = rejected(b"just some text, saved as shirt.png\n")
    assert (error.kind, error.status) == ("unsupported-image-format", 415)


@pytest.mark.parametrize("pillow_format", ["GIF", "BMP", "TIFF"])
def test_formats_pillow_reads_but_we_do_not_accept(pillow_format: str) -> None:
    error = rejected(encode(photo(), pillow_format))
    assert (error.kind, error.status) == ("unsupported-image-format", 415)


def test_allowed_formats_are_configurable() -> None:
    limits = ImageLimits(allowed_formats=frozenset({"png", "jpeg"}))
    error = rejected(encode(photo(), "WEBP"), limits)
    assert error.kind == "unsupported-image-format"
    assert "WEBP" in error.detail


def test_png_magic_with_garbage_is_corrupt() -> None:
    error = rejected(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert (error.kind, error.status) == ("corrupt-image", 422)


# --- decompression bombs -----------------------------------------------------------------


@pytest.mark.usefixtures("no_decoding")
def test_png_header_declaring_20000_square_is_refused_without_decoding() -> None:
    # A few dozen bytes with valid CRCs whose header promises 400 megapixels.
    data = raw_png(20_000, 20_000)
    assert len(data) < 100
    started = time.perf_counter()
    error = rejected(data)
    assert time.perf_counter() - started < 1.0
    assert (error.kind, error.status) == ("image-dimensions-too-large", 422)


@pytest.mark.usefixtures("no_decoding")
def test_huge_header_beyond_pillows_guard_maps_to_the_same_kind() -> None:
    # Limits wide enough that Pillow's own DecompressionBombError fires first.
    limits = ImageLimits(max_side=50_000, max_pixels=Image.MAX_IMAGE_PIXELS or 10**8)
    assert rejected(raw_png(20_000, 20_000), limits).kind == "image-dimensions-too-large"


@pytest.mark.usefixtures("no_decoding")
def test_jpeg_header_declaring_20000_square_is_refused_without_decoding() -> None:
    assert rejected(jpeg_with_size(20_000, 20_000)).kind == "image-dimensions-too-large"


@pytest.mark.usefixtures("no_decoding")
def test_real_compressible_png_over_the_limits() -> None:
    # 48 megapixels of white compress to a few tens of kilobytes.
    data = encode(Image.new("L", (8000, 6000), 255), "PNG")
    assert len(data) < 200_000
    error = rejected(data)
    assert error.kind == "image-dimensions-too-large"
    assert "8000x6000" in error.detail


@pytest.mark.usefixtures("no_decoding")
def test_pixel_limit_applies_even_when_both_sides_fit() -> None:
    limits = ImageLimits(max_pixels=1_000_000)
    error = rejected(encode(Image.new("RGB", (1200, 1000)), "PNG"), limits)
    assert error.kind == "image-dimensions-too-large"
    assert "1,200,000 pixels" in error.detail


@pytest.mark.usefixtures("no_decoding")
def test_side_limit() -> None:
    limits = ImageLimits(max_side=500)
    error = rejected(encode(Image.new("RGB", (501, 10)), "PNG"), limits)
    assert error.kind == "image-dimensions-too-large"


def test_pillow_globals_are_left_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    inspect_image(encode(photo(), "PNG"))
    with pytest.raises(ImageRejected):
        inspect_image(raw_png(20_000, 20_000))
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- truncated, corrupt and lying files --------------------------------------------------


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_png(keep: float) -> None:
    data = encode(photo(256, 256), "PNG")
    assert rejected(data[: int(len(data) * keep)]).kind == "corrupt-image"


@pytest.mark.parametrize("pillow_format", ["JPEG", "WEBP"])
def test_truncated_jpeg_and_webp(pillow_format: str) -> None:
    data = encode(photo(256, 256), pillow_format)
    assert rejected(data[: len(data) // 2]).kind == "corrupt-image"


def test_png_with_a_bad_crc() -> None:
    data = bytearray(encode(photo(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    assert rejected(bytes(data)).kind == "corrupt-image"


def test_png_whose_header_lies_about_its_size() -> None:
    # The header says 100x100; the compressed data holds a single row.
    data = raw_png(100, 100, scanlines=b"\x10" * 300)
    assert rejected(data).kind == "corrupt-image"


def test_png_with_valid_crcs_but_broken_compressed_data() -> None:
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    broken = zlib.compress(b"\x00" * 5000)[:-8] + b"\xde\xad\xbe\xef" * 2
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", broken)
        + png_chunk(b"IEND", b"")
    )
    assert rejected(data).kind == "corrupt-image"


def _filtered_png(width: int, height: int, filters: list[int]) -> bytes:
    """A non-interlaced RGB PNG whose rows carry these filter types (CRCs and zlib valid)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(bytes([f]) + bytes(3 * width) for f in filters)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("row", [0, 17, 39])
def test_png_row_with_an_unknown_filter_is_refused(row: int) -> None:
    filters = [1] * 40
    filters[row] = 9
    assert rejected(_filtered_png(30, 40, filters)).kind == "corrupt-image"
    filters[row] = 4  # Paeth, the last defined filter
    assert inspect_image(_filtered_png(30, 40, filters)).height == 40


def test_plain_png_is_validated_without_a_second_decode(no_decoding: None) -> None:
    # The chunk walk inflated every row and read its filter: a decode would add nothing.
    info = inspect_image(encode(photo(), "PNG"))
    assert (info.format, info.width, info.height, info.orientation) == ("png", 96, 64, 1)


def test_png_with_exif_is_still_decoded_to_read_its_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(), "PNG", exif=exif.tobytes())
    assert inspect_image(data).orientation == 6


def test_worker_skips_the_walk_only_for_the_bytes_that_were_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hashlib

    from hiddenmodel import images

    data = encode(photo(), "PNG")
    digest = hashlib.sha256(data).hexdigest()
    walks: list[int] = []
    original = images._check_png_structure

    def counting(*args: object) -> object:
        walks.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "_check_png_structure", counting)
    assert decode_image(data, validated_sha256=digest).size == (96, 64)
    assert walks == []
    assert decode_image(data).size == (96, 64)
    assert walks == [1]
    # Other bytes than the validated ones are walked (and a damaged copy refused).
    damaged = bytearray(data)
    damaged[data.index(b"IDAT") + 10] ^= 0xFF
    with pytest.raises(ImageRejected):
        decode_image(bytes(damaged), validated_sha256=digest)
    assert walks == [1, 1]


# --- animation ---------------------------------------------------------------------------


@pytest.mark.parametrize("pillow_format", ["WEBP", "PNG"])
def test_animated_images_are_refused(pillow_format: str) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    data = encode(frames[0], pillow_format, save_all=True, append_images=frames[1:])
    error = rejected(data)
    assert (error.kind, error.status) == ("animated-image-not-supported", 422)
    assert "3 frames" in error.detail


def test_single_frame_webp_is_fine() -> None:
    assert inspect_image(encode(photo(), "WEBP")).format == "webp"


# --- colour modes and orientation --------------------------------------------------------


def test_cmyk_jpeg_is_accepted_and_decodes_to_the_right_colours() -> None:
    patches = {
        (0, 0): ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        (1, 0): ((0, 255, 0, 0), (255, 0, 255)),  # magenta
        (0, 1): ((0, 0, 255, 0), (255, 255, 0)),  # yellow
        (1, 1): ((0, 0, 0, 128), (127, 127, 127)),  # half black
    }
    cmyk = Image.new("CMYK", (64, 64))
    for (px, py), (ink, _) in patches.items():
        cmyk.paste(ink, (px * 32, py * 32, px * 32 + 32, py * 32 + 32))
    data = encode(cmyk, "JPEG", quality=95)

    info = inspect_image(data)
    assert (info.format, info.mode, info.has_alpha) == ("jpeg", "CMYK", False)
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    pixels = np.asarray(decoded, dtype=np.int16)
    for (px, py), (_, rgb) in patches.items():
        centre = pixels[py * 32 + 16, px * 32 + 16]
        assert np.abs(centre - rgb).max() <= 6, (rgb, centre)


def test_cmyk_jpeg_with_an_unusable_profile_falls_back_to_the_formula() -> None:
    cmyk = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    data = encode(cmyk, "JPEG", quality=95, icc_profile=b"not really a profile")
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert "icc_profile" not in decoded.info
    assert np.abs(np.asarray(decoded, dtype=np.int16)[16, 16] - (0, 255, 255)).max() <= 6


@pytest.mark.parametrize(("width", "height"), [(13, 7), (64, 48), (1, 1), (3, 17)])
def test_interlaced_png(width: int, height: int) -> None:
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = interlaced_png(pixels)
    assert inspect_image(data).width == width
    assert np.array_equal(np.asarray(decode_image(data)), pixels)
    # Cutting the image data short is caught for interlaced files too.
    short = interlaced_png(pixels[: max(1, height // 2)])
    lying = short.replace(
        short[8:33], png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1))
    )
    if height > 1:
        assert rejected(lying).kind == "corrupt-image"


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    info = inspect_image(data)
    assert info.mode.startswith("I")
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    row = np.asarray(decoded)[0, :, 0]
    # Pillow's own conversion would clip everything above 255 to white.
    assert row.tolist() == [0, 1, 128, 255]


def test_16_bit_rgb_png_decodes_to_8_bit() -> None:
    pixels = np.array(
        [[[65535, 0, 0], [0, 32768, 0], [0, 0, 256], [65535, 65535, 65535]]], dtype=np.uint16
    ).repeat(3, axis=0)
    data = png16_rgb(pixels)
    assert inspect_image(data).width == 4
    decoded = np.asarray(decode_image(data), dtype=np.int16)
    expected = np.rint(pixels[0] / 257.0)
    assert np.abs(decoded[0] - expected).max() <= 1


def test_exif_orientation_6_is_applied() -> None:
    # Stored landscape 60x30 with a red block in the stored top-left corner. Orientation 6
    # means "rotate 90 degrees clockwise to display": the block lands top-right.
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())

    info = inspect_image(data)
    assert (info.width, info.height, info.orientation) == (60, 30, 6)
    assert info.display_size == (30, 60)

    decoded = decode_image(data)
    assert decoded.size == (30, 60)
    pixels = np.asarray(decoded, dtype=np.int16)
    assert np.abs(pixels[4, 30 - 5] - (255, 0, 0)).max() < 40  # top-right
    assert np.abs(pixels[4, 4] - (0, 0, 255)).max() < 40  # top-left
    assert np.abs(pixels[60 - 5, 4] - (0, 0, 255)).max() < 40
    # Orientation is consumed: encoding again must not rotate a second time.
    assert decode_image(encode_image(decoded, "jpeg")).size == (30, 60)


def test_palette_png_with_transparency_becomes_rgba() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 255, 255, 200, 30, 30] + [0, 0, 0] * 254)
    palette.paste(1, (0, 0, 4, 8))
    data = encode(palette, "PNG", transparency=0)

    info = inspect_image(data)
    assert (info.mode, info.has_alpha) == ("P", True)
    decoded = decode_image(data)
    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0)) == (200, 30, 30, 255)
    alpha = decoded.getpixel((7, 0))
    assert isinstance(alpha, tuple)
    assert alpha[3] == 0


def test_rgb_png_with_a_transparent_colour_becomes_rgba() -> None:
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((10, 200, 30), (0, 0, 4, 8))
    decoded = decode_image(encode(image, "PNG", transparency=(0, 0, 0)))
    assert decoded.mode == "RGBA"
    assert decoded.getpixel((1, 1)) == (10, 200, 30, 255)
    pixel = decoded.getpixel((6, 1))
    assert isinstance(pixel, tuple)
    assert pixel[3] == 0


def test_palette_png_without_transparency_becomes_rgb() -> None:
    data = encode(photo().convert("P"), "PNG")
    assert decode_image(data).mode == "RGB"


@pytest.mark.parametrize(("mode", "expected"), [("L", "RGB"), ("LA", "RGBA"), ("1", "RGB")])
def test_grey_modes(mode: str, expected: str) -> None:
    decoded = decode_image(encode(photo().convert(mode), "PNG"))
    assert decoded.mode == expected


def test_text_chunks_do_not_matter() -> None:
    meta = PngInfo()
    meta.add_text("Comment", "x" * 10_000)
    assert inspect_image(encode(photo(), "PNG", pnginfo=meta)).width == 96


def test_validating_a_1024_square_png_is_fast() -> None:
    data = encode(scene("shirt", (38, 52, 96), width=1024, height=1024).image, "PNG")
    inspect_image(data)
    started = time.perf_counter()
    for _ in range(5):
        inspect_image(data)
    # A full decode of a 1024x1024 photo-like PNG takes some tens of milliseconds.
    assert (time.perf_counter() - started) / 5 < 1.0


# --- encoding ----------------------------------------------------------------------------


def test_content_types() -> None:
    assert content_type("png") == "image/png"
    assert content_type("jpeg") == "image/jpeg"
    assert content_type("webp") == "image/webp"


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encode_keeps_alpha(fmt: str) -> None:
    image = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    image.paste((200, 100, 50, 255), (0, 0, 8, 16))
    decoded = decode_image(encode_image(image, fmt, quality=100))  # type: ignore[arg-type]
    assert decoded.mode == "RGBA"
    pixels = np.asarray(decoded)
    assert pixels[8, 2, 3] == 255
    assert pixels[8, 13, 3] == 0


def test_jpeg_encoding_flattens_alpha_onto_white() -> None:
    image = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    image.paste((200, 30, 30, 255), (0, 0, 16, 32))
    data = encode_image(image, "jpeg", quality=95)
    assert inspect_image(data).format == "jpeg"
    pixels = np.asarray(decode_image(data), dtype=np.int16)
    assert np.abs(pixels[16, 28] - 255).max() <= 3
    assert np.abs(pixels[16, 4] - (200, 30, 30)).max() <= 12


def test_encoded_png_roundtrips_exactly() -> None:
    image = photo()
    assert np.array_equal(np.asarray(decode_image(encode_image(image, "png"))), np.asarray(image))


def test_encoding_a_16_bit_image_scales_it() -> None:
    values = np.full((4, 4), 32768, dtype=np.uint16)
    data = encode_image(Image.fromarray(values), "png")
    assert np.asarray(decode_image(data))[0, 0].tolist() == [128, 128, 128]


def test_quality_is_checked() -> None:
    with pytest.raises(ValueError, match="quality"):
        encode_image(photo(), "jpeg", quality=0)


def test_rejection_carries_kind_status_and_detail() -> None:
    error = ImageRejected("image-too-large", "Too big.", status=413)
    assert (error.kind, error.status, error.detail, str(error)) == (
        "image-too-large",
        413,
        "Too big.",
        "Too big.",
    )
    assert error.title == "Image too large"


@pytest.mark.parametrize("compression", ["fast", "small"])
def test_icc_profile_of_rgb_images_is_carried_through(compression: PngCompression) -> None:
    profile = b"fake-but-opaque-icc-profile-bytes"
    data = encode(photo(), "PNG", icc_profile=profile)
    decoded = decode_image(data)
    assert decoded.info.get("icc_profile") == profile
    again = Image.open(io.BytesIO(encode_image(decoded, "png", png_compression=compression)))
    assert again.info.get("icc_profile") == profile
    assert np.array_equal(np.asarray(again), np.asarray(decoded))


def chunk_types(data: bytes) -> list[bytes]:
    """The chunks of a PNG in order, each one's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        found.append(kind)
        at += 12 + length
    assert found[0] == b"IHDR" and found[-1] == b"IEND"
    return found


def smooth_photo(width: int = 256, height: int = 192) -> Image.Image:
    """Lit gradients and mild sensor noise: where row filters pay."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([60 + 0.5 * x, 90 + 0.4 * y, 200 - 0.3 * (x + y) / 2], axis=-1)
    noise = np.random.default_rng(1).normal(0, 2.0, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("compression", ["fast", "small"])
def test_png_outputs_are_lossless_in_every_mode(mode: str, compression: PngCompression) -> None:
    image = smooth_photo()
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.asarray(photo(256, 192))[..., 0], "L")
        image = Image.merge("RGBA", (*image.split(), alpha))
    image = image.convert(mode)
    data = encode_image(image, "png", png_compression=compression)
    chunk_types(data)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_fast_png_is_fpng_and_small_png_is_smaller() -> None:
    image = smooth_photo()
    fast = encode_image(image, "png")
    small = encode_image(image, "png", png_compression="small")
    assert b"fdEC" in chunk_types(fast)  # fpng marks what it wrote
    assert b"fdEC" not in chunk_types(small)
    assert len(small) < len(fast)
    # fpng writes three or four channels only: greyscale goes Pillow's way whatever is asked.
    assert b"fdEC" not in chunk_types(encode_image(image.convert("L"), "png"))


def test_fast_png_falls_back_when_fpng_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its binding returns empty bytes instead of raising when fpng refuses an image.
    monkeypatch.setattr(images.fpng_ext, "encode_image_to_memory", lambda *args: b"")
    image = smooth_photo()
    data = encode_image(image, "png")
    assert b"fdEC" not in chunk_types(data)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_png_compression_is_checked() -> None:
    with pytest.raises(ValueError, match="PNG compression"):
        encode_image(photo(), "png", png_compression="tiny")  # type: ignore[arg-type]


# --- PNG image data inflated by ISA-L, handed to Pillow as stored blocks ------------------


def _pillow_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _stored_variants() -> list[tuple[str, bytes]]:
    base = photo(67, 45, seed=3)
    out = [
        (mode, encode(base.convert(mode), "PNG"))
        for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")
    ]
    out.append(("P+tRNS", encode(base.convert("P"), "PNG", transparency=3)))
    out.append(("RGB+tRNS", encode(base, "PNG", transparency=(0, 0, 0))))
    rng = np.random.default_rng(5)
    out.append(("interlaced", interlaced_png(rng.integers(0, 256, (19, 23, 3), dtype=np.uint8))))
    out.append(("16-bit RGB", png16_rgb(rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16))))
    exif = Image.Exif()
    exif[0x0112] = 6
    out.append(("EXIF", encode(base, "PNG", exif=exif.tobytes())))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out.append(("ICC", encode(base, "PNG", icc_profile=icc)))
    # The image data split over many small IDAT chunks, a text chunk after them.
    rows = b"".join(b"\x04" + bytes(range(i, i + 3 * 40)) for i in range(30))
    packed = zlib.compress(rows, 9)
    ihdr = struct.pack(">IIBBBBB", 40, 30, 8, 2, 0, 0, 0)
    out.append(
        (
            "many IDAT",
            b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", ihdr)
            + b"".join(png_chunk(b"IDAT", packed[i : i + 50]) for i in range(0, len(packed), 50))
            + png_chunk(b"tEXt", b"Comment\0after the image data")
            + png_chunk(b"IEND", b""),
        )
    )
    return out


@pytest.mark.parametrize(("name", "data"), _stored_variants(), ids=lambda v: str(v)[:12])
def test_png_data_stored_uncompressed_decodes_to_the_same_image(name: str, data: bytes) -> None:
    """The stored copy changes how the stream is compressed and nothing else: Pillow reads
    the same mode, pixels and chunks (palette, transparency, ICC, EXIF, text) from it."""
    width, height = _pillow_decode(data).size
    stored = images._png_stored(data, width, height)
    assert stored is not None, name
    # Every block is stored: the stream is a little larger than the inflated rows.
    assert len(stored) > images._png_raw_size(width, height, data[16:29])
    original, copy = _pillow_decode(data), _pillow_decode(stored)
    assert (copy.mode, copy.size) == (original.mode, original.size)
    assert np.array_equal(np.asarray(copy), np.asarray(original))
    assert copy.info == original.info
    assert copy.getexif() == original.getexif()
    assert images.inspect_image(stored).width == width  # CRCs, walk and all


def test_a_large_png_is_stored_in_blocks_of_at_most_65535_bytes() -> None:
    data = encode(photo(300, 250, seed=4), "PNG")
    stored = images._png_stored(data, 300, 250)
    assert stored is not None
    assert np.array_equal(np.asarray(_pillow_decode(stored)), np.asarray(_pillow_decode(data)))
    assert len(stored) - len(data[:33]) < 250 * (1 + 900) + 5 * (250 * 901 // 65535 + 1) + 40


def test_decoding_uses_the_stored_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[bytes | None] = []
    original = images._png_stored

    def spy(data: bytes, width: int, height: int) -> bytes | None:
        made.append(original(data, width, height))
        return made[-1]

    monkeypatch.setattr(images, "_png_stored", spy)
    picture = photo(50, 40, seed=6)
    decoded = decode_image(encode(picture, "PNG"))
    assert len(made) == 1 and made[0] is not None
    assert np.array_equal(np.asarray(decoded), np.asarray(picture))


def test_unusual_png_data_is_decoded_from_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    """None: the original goes to Pillow, which treats it as it always has."""
    rows = b"".join(b"\x00" + bytes(3 * 20) for _ in range(10))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 10, 8, 2, 0, 0, 0))
    head, end = b"\x89PNG\r\n\x1a\n" + ihdr, png_chunk(b"IEND", b"")
    good = head + png_chunk(b"IDAT", zlib.compress(rows)) + end
    assert images._png_stored(good, 20, 10) is not None
    unusual = {
        "one row more": head + png_chunk(b"IDAT", zlib.compress(rows + rows[:61])) + end,
        "a row short": head + png_chunk(b"IDAT", zlib.compress(rows[:-61])) + end,
        "broken stream": head + png_chunk(b"IDAT", zlib.compress(rows)[:-6] + b"\xff" * 6) + end,
        "split image data": head
        + png_chunk(b"IDAT", zlib.compress(rows)[:20])
        + png_chunk(b"tEXt", b"a\0b")
        + png_chunk(b"IDAT", zlib.compress(rows)[20:])
        + end,
        "animation chunks": head
        + png_chunk(b"acTL", struct.pack(">II", 1, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + end,
        "no image data": head + end,
        "truncated": good[:-20],
    }
    for name, data in unusual.items():
        assert images._png_stored(data, 20, 10) is None, name
    monkeypatch.setattr(images, "_STORED_MAX_RAW", len(rows) - 1)  # a copy too large to make
    assert images._png_stored(good, 20, 10) is None
    # What Pillow makes of them is unchanged: the lying and broken ones are still refused.
    for name in ("a row short", "broken stream", "truncated"):
        assert rejected(unusual[name]).kind == "corrupt-image", name
