"""Uploaded images: validation at submit time, decoding and encoding in the workers.

Validation refuses anything a worker could choke on, with a stable ``kind`` per reason, so
the API answers with a clear 4xx instead of a job that crashes later. The order matters:
the byte size is checked before anything is parsed, the format is sniffed from the
content, and the dimensions are read from the header and checked before a single pixel is
decoded, so a decompression bomb costs a few hundred bytes of parsing. Only then is the
whole file decoded, which catches truncated and corrupt data.

Pillow's process-wide settings are left alone: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
False (truncated files must fail to decode) and ``Image.MAX_IMAGE_PIXELS`` keeps its value
as a second guard behind the explicit limits here. Nothing in this module imports torch.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import types
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, get_args

import numpy as np
from fpng import fpng_ext
from PIL import Image, ImageCms, ImageFile, ImageOps

ImageFormat = Literal["png", "jpeg", "webp"]
# How much CPU a PNG output may cost: "fast" is fpng (one pass, fixed filter, its own
# deflate), "small" is Pillow's adaptive row filters deflated at level 1. On photographs
# fitted to 512 px "fast" took a twentieth of the CPU for files about 15 % larger
# (docs/BENCHMARKS.md); both are lossless.
PngCompression = Literal["fast", "small"]

_CONTENT_TYPES: Final[dict[ImageFormat, str]] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
_PILLOW_NAMES: Final[dict[ImageFormat, str]] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_EXIF_ORIENTATION: Final = 0x0112
_MB: Final = 1024 * 1024
PNG_COMPRESS_LEVEL: Final = 1
# Run-length matching only: after PNG's row filters it finds nearly all deflate would, and
# was 15 % smaller and 10 % faster than plain level 1 on photographs and garment scenes.
PNG_COMPRESS_STRATEGY: Final = zlib.Z_RLE


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be. The defaults are the service's documented input limits.

    These limits are checked explicitly, before any pixel is decoded. Pillow's global
    ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels) stays in force behind them: a
    ``max_pixels`` above it makes Pillow warn while reading such headers, and headers
    above twice it are refused by Pillow as bombs, reported here as
    ``image-dimensions-too-large`` like any other oversized image.
    """

    max_bytes: int = 50 * _MB
    max_pixels: int = 40_000_000
    max_side: int = 6000
    allowed_formats: frozenset[ImageFormat] = field(
        default_factory=lambda: frozenset(get_args(ImageFormat))
    )

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_side <= 0:
            raise ValueError("image limits must be positive")
        unknown = set(self.allowed_formats) - set(get_args(ImageFormat))
        if unknown:
            raise ValueError(f"unsupported formats in image limits: {sorted(unknown)}")


DEFAULT_LIMITS: Final = ImageLimits()


class ImageRejected(Exception):
    """An upload that cannot be processed. ``kind`` is stable; ``detail`` is for people."""

    def __init__(self, kind: str, detail: str, *, status: int = 422, title: str = "") -> None:
        super().__init__(detail)
        self.kind = kind
        self.status = status
        self.detail = detail
        self.title = title or kind.replace("-", " ").capitalize()


@dataclass(frozen=True)
class ImageInfo:
    """What the header and a full decode say about an accepted image.

    ``width`` and ``height`` are as stored; ``orientation`` is the EXIF orientation (1 when
    absent), and ``display_size`` is the size once that orientation is applied.
    """

    format: ImageFormat
    width: int
    height: int
    mode: str
    has_alpha: bool
    orientation: int

    @property
    def display_size(self) -> tuple[int, int]:
        # Orientations 5-8 include a quarter turn.
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def content_type(format: ImageFormat) -> str:
    """The media type for an encoded image format."""
    return _CONTENT_TYPES[format]


_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format the content says it is (never the file name), or None."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _corrupt(fmt: ImageFormat, exc: BaseException) -> ImageRejected:
    return ImageRejected(
        "corrupt-image",
        f"The {fmt.upper()} file is truncated or corrupt and cannot be decoded ({exc}).",
    )


def _open_header(data: bytes | bytearray, fmt: ImageFormat) -> ImageFile.ImageFile:
    """Parse the header only; Pillow decodes no pixels until ``load``."""
    try:
        im = Image.open(io.BytesIO(data), formats=[_PILLOW_NAMES[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageRejected(
            "image-dimensions-too-large",
            f"The image header declares dimensions far beyond the limits ({exc}).",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals bad headers with many exception types.
        raise _corrupt(fmt, exc) from exc
    return im


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt-image", f"The image declares an empty size {width}x{height}.")
    if max(width, height) > limits.max_side:
        raise ImageRejected(
            "image-dimensions-too-large",
            f"The image is {width}x{height} pixels; the longest side may be at most "
            f"{limits.max_side} pixels.",
        )
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "image-dimensions-too-large",
            f"The image is {width}x{height} = {width * height:,} pixels; at most "
            f"{limits.max_pixels:,} pixels are accepted.",
        )


_PNG_CHANNELS: Final = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x offset, y offset, x step, y step).
_ADAM7: Final = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_INFLATE_STEP: Final = 1 << 20

# ISA-L inflates the same streams to the same bytes about three times faster than zlib on
# x86-64 (4 ms against 15 ms for a 1024x1024 photograph); zlib when it is not installed.
_inflate: types.ModuleType
try:
    from isal import isal_zlib

    _inflate = isal_zlib
except ImportError:  # pragma: no cover - a platform without an isal wheel
    _inflate = zlib
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, _inflate.error)


def _png_raw_size(width: int, height: int, ihdr: bytes) -> int:
    bit_depth, colour_type, interlace = ihdr[8], ihdr[9], ihdr[12]
    bits = _PNG_CHANNELS.get(colour_type, 0) * bit_depth
    if bits == 0:
        raise ImageRejected("corrupt-image", "The PNG header has an invalid colour type.")

    def rows(w: int, h: int) -> int:
        # One filter byte per row, then the packed samples.
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if interlace == 0:
        return rows(width, height)
    return sum(
        rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7
    )


@dataclass(frozen=True)
class _PngWalk:
    """What walking a PNG's chunks proved."""

    # Every row's filter type was read and is one of the five PNG defines (non-interlaced
    # images): with the CRCs, a complete inflate and the size check, nothing is left that a
    # pixel decode would find wrong.
    rows_checked: bool
    has_exif: bool


def _check_png_structure(data: bytes, width: int, height: int) -> _PngWalk:
    """Walk the chunks: CRCs, the IEND marker, and enough image data for the header.

    Pillow fills rows missing from a short but well-formed zlib stream with zeros and
    reports success, so a file whose header promises more than its data holds would pass
    a plain decode. The stream is inflated in bounded steps, never kept, and the walk stops
    once the header's size is reached. Of a non-interlaced image it also reads each row's
    filter byte on the way (an unknown filter is what a decode would still refuse).
    """
    view = memoryview(data)
    pos, ihdr, ended, has_exif = 8, b"", False, False
    inflater = _inflate.decompressobj()
    expected, produced, stride = -1, 0, 0

    def take(out: bytes) -> None:
        nonlocal produced
        if stride and produced < expected:
            filters = out[(-produced) % stride : expected - produced : stride]
            if filters and max(filters) > 4:
                raise ImageRejected(
                    "corrupt-image", "The PNG image data has a row with an unknown filter."
                )
        produced += len(out)

    try:
        while pos + 8 <= len(data):
            length = int.from_bytes(view[pos : pos + 4], "big")
            kind = bytes(view[pos + 4 : pos + 8])
            end = pos + 8 + length
            if end + 4 > len(data):
                raise ImageRejected("corrupt-image", "The PNG file is truncated.")
            crc = int.from_bytes(view[end : end + 4], "big")
            if _inflate.crc32(view[pos + 4 : end]) != crc:
                raise ImageRejected("corrupt-image", f"The PNG {kind!r} chunk is damaged.")
            if kind == b"IHDR":
                ihdr = bytes(view[pos + 8 : end])
                expected = _png_raw_size(width, height, ihdr)
                if ihdr[12] == 0:  # not interlaced: rows of one size
                    stride = expected // height if height else 0
            elif kind == b"IDAT" and produced <= expected:
                pending: bytes | memoryview = view[pos + 8 : end]
                while pending and produced <= expected:
                    take(inflater.decompress(pending, _INFLATE_STEP))
                    pending = inflater.unconsumed_tail
            elif kind == b"eXIf":
                has_exif = True
            elif kind == b"IEND":
                ended = True
                break
            pos = end + 4
        if produced < expected:
            take(inflater.flush())
    except _INFLATE_ERRORS as exc:
        raise _corrupt("png", exc) from exc
    if not ended or not ihdr:
        raise ImageRejected("corrupt-image", "The PNG file is truncated (no end marker).")
    if produced < expected:
        raise ImageRejected(
            "corrupt-image",
            f"The PNG image data holds {produced:,} of the {expected:,} bytes its header promises.",
        )
    return _PngWalk(rows_checked=bool(stride), has_exif=has_exif)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except MemoryError:
        raise
    except Exception:
        # Broken EXIF is common in the wild and harmless: treat it as upright.
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _verified_header(
    data: bytes, limits: ImageLimits, *, walked: bool = False
) -> tuple[ImageFile.ImageFile, ImageFormat, _PngWalk | None]:
    """Every check before the pixel decode: byte size, format, dimensions, animation and, for
    a PNG not ``walked`` already, the chunk walk. The header, its format and the walk."""
    if len(data) == 0:
        raise ImageRejected("empty-file", "The uploaded file is empty.")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "image-too-large",
            f"The file is {len(data):,} bytes; at most {limits.max_bytes:,} bytes are accepted.",
            status=413,
        )
    fmt = sniff_format(data)
    allowed = ", ".join(sorted(f.upper() for f in limits.allowed_formats))
    if fmt is None or fmt not in limits.allowed_formats:
        what = fmt.upper() if fmt else "not a recognised image"
        raise ImageRejected(
            "unsupported-image-format",
            f"The file content is {what}; accepted formats are {allowed}.",
            status=415,
        )

    header = _open_header(data, fmt)
    width, height = header.size
    _check_dimensions(width, height, limits)
    frames = getattr(header, "n_frames", 1)
    if not isinstance(frames, int) or frames != 1:
        raise ImageRejected(
            "animated-image-not-supported",
            f"The {fmt.upper()} file is animated ({frames} frames); send a single still image.",
        )

    walk = _check_png_structure(data, width, height) if fmt == "png" and not walked else None
    return header, fmt, walk


def _load_verified(
    data: bytes, limits: ImageLimits, *, decode: bool = True, walked: bool = False
) -> tuple[ImageFile.ImageFile, ImageInfo]:
    header, fmt, walk = _verified_header(data, limits, walked=walked)
    return _decoded(data, header, fmt, walk, decode=decode)


def _decoded(
    data: bytes,
    header: ImageFile.ImageFile,
    fmt: ImageFormat,
    walk: _PngWalk | None,
    *,
    decode: bool,
) -> tuple[ImageFile.ImageFile, ImageInfo]:
    """The pixel decode after :func:`_verified_header`'s checks, where one is needed."""
    width, height = header.size
    # A plain PNG whose walk read every row is fully checked: decoding it a second time
    # would find nothing new (and EXIF, when there is some, is only read by a decode).
    if decode or walk is None or not walk.rows_checked or walk.has_exif:
        try:
            if fmt == "png" and (stored := _png_stored(data, width, height)) is not None:
                header = _open_header(stored, fmt)
            header.load()
        except MemoryError:
            raise
        except Exception as exc:
            raise _corrupt(fmt, exc) from exc
        if header.size != (width, height):
            raise ImageRejected("corrupt-image", "The decoded size differs from the header.")
        orientation = _orientation(header)
    else:
        orientation = 1

    info = ImageInfo(
        format=fmt,
        width=width,
        height=height,
        mode=header.mode,
        has_alpha=_has_alpha(header),
        orientation=orientation,
    )
    return header, info


def inspect_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> ImageInfo:
    """Fully validate an uploaded image and describe it, or raise :class:`ImageRejected`.

    Checks, in order: empty file, byte size, format sniffed from the content (the file
    name is never consulted), header dimensions against the limits, animation, and all of
    the image data (a decode; for a non-interlaced PNG without EXIF, the chunk walk, which
    inflates every row and reads its filter, says all a decode would). CMYK, 16-bit,
    palette and greyscale images and any EXIF orientation are accepted;
    :func:`decode_image` normalises them.
    """
    image, info = _load_verified(data, limits, decode=False)
    image.close()
    return info


def _to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's own conversion from 16/32-bit integer modes clips at 255 instead of
    # rescaling, which would turn most of a 16-bit image white.
    if image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0
        return Image.fromarray(np.rint(values).astype(np.uint8))
    values16 = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    # round(v / 257) in integers: 65535 maps to 255, 32768 to 128.
    return Image.fromarray(((values16 + 128) // 257).astype(np.uint8))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        # A print profile describes what the CMYK numbers mean; the plain formula is only
        # a fallback for files without one.
        try:
            converted = ImageCms.profileToProfile(
                image,
                ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            converted = None
        if converted is not None:
            return converted
    return image.convert("RGB")


def _normalise_mode(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGBA" or (mode == "RGB" and "transparency" not in image.info):
        return image
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I") or mode == "F":
        return _to_8bit(image).convert("RGB")
    # Palette, greyscale (with or without alpha) and bilevel images.
    return image.convert("RGBA" if _has_alpha(image) else "RGB")


def decode_image(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, validated_sha256: str | None = None
) -> Image.Image:
    """Validate and decode an upload into an upright 8-bit RGB or RGBA image.

    Runs every check of :func:`inspect_image`, then applies the EXIF orientation, converts
    CMYK to RGB (through the embedded ICC profile when there is one), scales 16-bit samples
    to 8 bits and expands palettes. Images with any transparency come back RGBA, all others
    RGB. An embedded RGB ICC profile is kept in ``image.info`` so encoding can carry it.

    ``validated_sha256``: the SHA-256 (hex) of bytes :func:`inspect_image` accepted. When
    ``data`` has that digest, the PNG chunk walk is not repeated (it takes about as long
    as the decode); the decode itself, and every header check, still run.
    """
    walked = _was_walked(data, validated_sha256)
    image, _ = _load_verified(data, limits, walked=walked)
    return _upright(image)


def decode_image_or_plain_png(
    data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *, validated_sha256: str | None = None
) -> Image.Image | PlainPng:
    """:func:`decode_image`, except that a :class:`PlainPng` comes back undecoded, after the
    same checks, for a caller that decodes it its own way (a libvips reduction reads and
    shrinks it in one pass). Its :meth:`PlainPng.decode` is what decode_image returns.

    A plain PNG needs neither the walk nor the digest that lets a validated upload skip it:
    making its stored copy checks all that the walk would (see :func:`_png_stored`). Any
    other image, or a PNG that fails those checks, goes the way :func:`decode_image` does,
    where the walk says what is wrong."""
    header, fmt, _ = _verified_header(data, limits, walked=True)
    if fmt == "png" and (plain := _plain_png(data, header)) is not None:
        header.close()
        return plain
    walk = None
    if fmt == "png" and not _was_walked(data, validated_sha256):
        walk = _check_png_structure(data, *header.size)
    image, _ = _decoded(data, header, fmt, walk, decode=True)
    return _upright(image)


def _was_walked(data: bytes, validated_sha256: str | None) -> bool:
    return validated_sha256 is not None and hmac.compare_digest(
        hashlib.sha256(data).hexdigest(), validated_sha256
    )


def _upright(image: ImageFile.ImageFile) -> Image.Image:
    icc = image.info.get("icc_profile")
    source_mode = image.mode
    # In place: a 40-megapixel image is not copied just to be turned.
    ImageOps.exif_transpose(image, in_place=True)
    normalised = _normalise_mode(image)
    normalised.info = {}
    if icc and source_mode in ("RGB", "RGBA"):
        normalised.info["icc_profile"] = icc
    return normalised


def encode_image(
    image: Image.Image,
    format: ImageFormat,
    quality: int = 90,
    *,
    png_compression: PngCompression = "fast",
) -> bytes:
    """Encode an image; JPEG has no alpha, so it is flattened onto white.

    RGB, RGBA, L and LA are written as they are; other modes are first normalised as
    :func:`decode_image` does (16-bit scaled, CMYK and palettes converted).

    ``quality`` (1-100) applies to JPEG and WEBP. ``png_compression`` to PNG: "fast" writes
    RGB and RGBA with fpng (see :data:`PngCompression`; L and LA, which it does not write,
    go the "small" way), "small" with Pillow at zlib level 1 and the run-length strategy,
    on photographs about as small as level 6 for an eighth of the CPU. EXIF is never
    written (orientation has been applied already, and camera metadata is not passed on);
    an RGB ICC profile in ``image.info`` is.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, not {quality}")
    if format not in _CONTENT_TYPES:
        raise ValueError(f"unsupported output format {format!r}")
    if png_compression not in get_args(PngCompression):
        raise ValueError(f"unsupported PNG compression {png_compression!r}")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = _normalise_mode(image)
    icc = image.info.get("icc_profile") if image.mode in ("RGB", "RGBA") else None

    out = io.BytesIO()
    extra: dict[str, object] = {"icc_profile": icc} if icc else {}
    if format == "jpeg":
        if image.mode in ("RGBA", "LA"):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
        image.save(out, "JPEG", quality=quality, optimize=False, **extra)
    elif format == "png":
        if png_compression == "fast" and (fast := _fpng(image, icc)) is not None:
            return fast
        image.save(
            out,
            "PNG",
            optimize=False,
            compress_level=PNG_COMPRESS_LEVEL,
            compress_type=PNG_COMPRESS_STRATEGY,
            **extra,
        )
    else:
        image.save(out, "WEBP", quality=quality, method=4, **extra)
    return out.getvalue()


_IHDR_END: Final = len(_PNG_SIGNATURE) + 4 + 4 + 13 + 4  # length, type, data, CRC
# The profile name Pillow writes; readers take the profile, not its name.
_ICC_NAME: Final = b"ICC Profile"


def _fpng(image: Image.Image, icc: bytes | None) -> bytes | None:
    """RGB or RGBA as fpng writes it, with ``icc`` as an iCCP chunk; None for other modes,
    or if fpng refused the image (its binding then returns nothing rather than raising)."""
    if image.mode not in ("RGB", "RGBA"):
        return None
    data: bytes = fpng_ext.encode_image_to_memory(
        image.tobytes(), image.width, image.height, len(image.mode)
    )
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    if icc:
        data = (
            data[:_IHDR_END]
            + _png_chunk(b"iCCP", _ICC_NAME + b"\0\0" + zlib.compress(icc))
            + data[_IHDR_END:]
        )
    return data


# Above this much image data a PNG is decoded from its own stream (see _png_stored): the
# stored copy would hold the whole inflated image twice more for a while.
_STORED_MAX_RAW: Final = 96 * _MB


def _png_stored(data: bytes, width: int, height: int) -> bytearray | None:
    """``data`` with its image data inflated by the fast inflater and stored uncompressed.

    Pillow inflates a PNG with the system's zlib, two and a half times slower than ISA-L
    on photographs: about 10 of the 13 ms a 1024x1024 photo takes to decode. The same
    filtered rows, in stored deflate blocks, inflate as a copy: Pillow then only unfilters
    them, and the pixels are the very same (only the compression of the stream differs;
    every other chunk is kept, in its place). None, so the original is decoded as it
    is, for anything unusual: an animated PNG's chunks, IDAT chunks that are not
    consecutive, a stream that is damaged, longer or shorter than the header says, or
    too large to copy.

    It checks on the way all that :func:`_check_png_structure` does of a non-interlaced
    image (each chunk's CRC, the end marker, the whole stream of exactly the header's size,
    each row's filter type), so a copy made of one stands for the walk: the CRC of the
    image data it writes is its own, and would not tell.
    """
    if data[12:16] != b"IHDR":
        return None
    ihdr = data[16:29]
    expected = _png_raw_size(width, height, ihdr)
    if expected > _STORED_MAX_RAW:
        return None
    view = memoryview(data)
    pos, first, after, ended = 8, 0, 0, False
    pieces: list[memoryview] = []
    while pos + 8 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 8 + length + 4
        if end > len(data) or kind in (b"acTL", b"fcTL", b"fdAT"):
            return None
        if _inflate.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return None
        if kind == b"IDAT":
            if after:
                return None
            first = first or pos
            pieces.append(view[pos + 8 : end - 4])
        elif first and not after:
            after = pos
        pos = end
        if kind == b"IEND":
            ended = True
            break
    if not first or not after or not ended:
        return None
    inflater = _inflate.decompressobj()
    try:
        raw = inflater.decompress(b"".join(pieces), expected + 1)
    except _INFLATE_ERRORS:
        return None
    if len(raw) != expected or not inflater.eof:
        return None
    if ihdr[12] == 0 and height and max(raw[:: expected // height]) > 4:  # a row filter
        return None
    # One buffer, its size known up front so that the pixels are copied once: the chunks
    # before the image data, then an IDAT chunk holding zlib's header (no compression, no
    # dictionary), stored blocks of at most 65535 bytes (BFINAL on the last) and the Adler-32
    # of the inflated bytes, then the chunks after it.
    rows = memoryview(raw)
    idat = 2 + 5 * -(-expected // 0xFFFF) + expected + 4
    out = bytearray(first + 8 + idat + 4 + len(data) - after)
    out[:first] = view[:first]
    out[first : first + 10] = idat.to_bytes(4, "big") + b"IDAT\x78\x01"
    pos = first + 10
    for start in range(0, expected, 0xFFFF):
        size = min(0xFFFF, expected - start)
        final = 1 if start + size == expected else 0
        out[pos : pos + 5] = bytes(
            (final, size & 0xFF, size >> 8, ~size & 0xFF, (~size >> 8) & 0xFF)
        )
        out[pos + 5 : pos + 5 + size] = rows[start : start + size]
        pos += 5 + size
    out[pos : pos + 4] = _inflate.adler32(raw).to_bytes(4, "big")
    pos += 4
    out[pos : pos + 4] = _inflate.crc32(memoryview(out)[first + 4 : pos]).to_bytes(4, "big")
    out[pos + 4 :] = view[after:]
    return out


# Text chunks Pillow reads an orientation from: EXIF written as text, and XMP.
_PNG_ORIENTATION_KEYWORDS: Final = frozenset(
    {b"Raw profile type exif", b"XML:com.adobe.xmp", b"xmp"}
)


def _png_may_turn(data: bytes) -> bool:
    """Whether the PNG has anything :func:`decode_image` could read an orientation from: an
    eXIf chunk, or a text chunk of EXIF or XMP (before or after the image data)."""
    view = memoryview(data)
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        if kind == b"eXIf":
            return True
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword = bytes(view[pos + 8 : pos + 8 + min(length, 80)]).split(b"\0", 1)[0]
            if keyword in _PNG_ORIENTATION_KEYWORDS:
                return True
        if kind == b"IEND":
            break
        pos += 12 + length
    return False


@dataclass(frozen=True)
class PlainPng:
    """A checked 8-bit RGB PNG that :func:`decode_image` returns exactly as its pixels are
    stored: not interlaced, no transparency, nothing it could be turned by (EXIF or XMP).

    ``stored`` is the same PNG with its image data inflated by the fast inflater into stored
    blocks (see :func:`_png_stored`): a decoder that reads PNG itself (libvips) then only
    unfilters its rows. :meth:`decode` is the image :func:`decode_image` returns for it.
    """

    width: int
    height: int
    stored: bytes | bytearray = field(repr=False)
    icc_profile: bytes | None = field(default=None, repr=False)

    mode: ClassVar[str] = "RGB"

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def info(self) -> dict[str | tuple[int, int], Any]:
        """What :func:`decode_image` keeps in ``image.info``: the ICC profile, if any."""
        return {"icc_profile": self.icc_profile} if self.icc_profile else {}

    def decode(self) -> Image.Image:
        try:
            image = _open_header(self.stored, "png")
            image.load()
        except (MemoryError, ImageRejected):
            raise
        except Exception as exc:
            raise _corrupt("png", exc) from exc
        if image.size != self.size or image.mode != self.mode:
            raise ImageRejected("corrupt-image", "The decoded size differs from the header.")
        image.info = dict(self.info)
        return image


def _plain_png(data: bytes, header: ImageFile.ImageFile) -> PlainPng | None:
    """``data`` as a :class:`PlainPng` when it is one; None for anything else."""
    ihdr = data[16:29]
    if (
        header.mode != "RGB"
        or "transparency" in header.info
        or len(ihdr) != 13
        or (ihdr[8], ihdr[9], ihdr[12]) != (8, 2, 0)  # 8 bits, RGB, not interlaced
        or _png_may_turn(data)
    ):
        return None
    width, height = header.size
    stored = _png_stored(data, width, height)
    if stored is None:
        return None
    icc = header.info.get("icc_profile")
    return PlainPng(width, height, stored, icc if isinstance(icc, bytes) and icc else None)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def configured_limits() -> ImageLimits:
    """The limits set for this installation (``HM_MAX_UPLOAD_BYTES`` and friends)."""
    from hiddenmodel.settings import get_settings

    settings = get_settings()
    return ImageLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
        max_side=settings.max_image_side,
    )
