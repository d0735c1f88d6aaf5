"""Synthetic test images built in memory: hand-made files and studio scenes with known mattes.

Scenes imitate ghost-mannequin product shots: a garment silhouette with fabric texture and
fold shading on a studio backdrop that is lit unevenly (a gradient and a vignette) and
carries sensor noise. The true alpha comes from drawing the silhouette at 4x and averaging,
so edges have the same partial coverage a camera would record.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Point = tuple[float, float]

_SUPERSAMPLE = 4


# --- hand-made files -------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(
    width: int,
    height: int,
    *,
    bit_depth: int = 8,
    color_type: int = 2,
    scanlines: bytes | None = None,
    extra_chunks: Sequence[bytes] = (),
) -> bytes:
    """A PNG written byte by byte, so headers can say anything the test needs.

    ``scanlines`` are the unfiltered rows without filter bytes; when omitted the image data
    is a tiny zlib stream for a single zero row, whatever the header claims.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if scanlines is None:
        idat = zlib.compress(b"\x00\x00\x00\x00")
    else:
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
        row_bytes = width * channels * bit_depth // 8
        rows = [scanlines[i : i + row_bytes] for i in range(0, len(scanlines), row_bytes)]
        idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra_chunks)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG from an (h, w, 3) uint16 array (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    return raw_png(w, h, bit_depth=16, color_type=2, scanlines=pixels.astype(">u2").tobytes())


_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def interlaced_png(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG from an (h, w, 3) uint8 array (Pillow writes none)."""
    h, w, _ = pixels.shape
    raw = b""
    for x0, y0, dx, dy in _ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Save ``image`` in memory with Pillow."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is rewritten to claim another size."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no frame header found")


# --- studio scenes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """A synthetic product shot and the truth it was drawn from."""

    image: Image.Image  # RGB
    alpha: np.ndarray  # float32 (h, w) in [0, 1]: the garment's coverage of each pixel
    backdrop: np.ndarray  # float32 (h, w, 3): the backdrop as lit, before noise
    foreground: np.ndarray  # float32 (h, w, 3): the garment's colour under each pixel
    noise_sigma: float


def _scale(points: Sequence[Point], width: int, height: int) -> list[Point]:
    s = _SUPERSAMPLE
    return [(x * width * s, y * height * s) for x, y in points]


def _mirror(half: Sequence[Point]) -> list[Point]:
    """A symmetric outline from its left half, listed top to bottom."""
    return [*half, *[(1.0 - x, y) for x, y in reversed(half)]]


Shape = Callable[[ImageDraw.ImageDraw, int, int], None]


def shirt(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """A T-shirt laid flat: sleeves, a scooped neck opening and a straight hem."""
    outline = _mirror(
        [
            (0.50, 0.195),
            (0.46, 0.185),
            (0.43, 0.16),
            (0.40, 0.12),
            (0.30, 0.15),
            (0.12, 0.30),
            (0.19, 0.42),
            (0.28, 0.36),
            (0.29, 0.86),
            (0.50, 0.87),
        ]
    )
    draw.polygon(_scale(outline, width, height), fill=255)


def dress(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """A sleeveless A-line dress with thin shoulder straps and a flared hem."""
    body = _mirror(
        [
            (0.36, 0.22),
            (0.34, 0.34),
            (0.38, 0.46),
            (0.22, 0.90),
            (0.50, 0.93),
        ]
    )
    draw.polygon(_scale(body, width, height), fill=255)
    s = _SUPERSAMPLE
    strap = 0.014 * width * s
    for x0, x1 in ((0.38, 0.41), (0.62, 0.59)):
        draw.line(
            [(x0 * width * s, 0.23 * height * s), (x1 * width * s, 0.08 * height * s)],
            fill=255,
            width=round(strap),
        )
    neck = _mirror([(0.40, 0.215), (0.50, 0.30)])
    draw.polygon(_scale(neck, width, height), fill=0)


def bag(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """A rounded bag body with a handle: an ellipse with two openings to the backdrop."""
    s = _SUPERSAMPLE
    w, h = width * s, height * s
    draw.ellipse([0.30 * w, 0.12 * h, 0.70 * w, 0.55 * h], fill=255)
    draw.ellipse([0.38 * w, 0.20 * h, 0.62 * w, 0.40 * h], fill=0)
    draw.ellipse([0.14 * w, 0.42 * h, 0.86 * w, 0.88 * h], fill=255)
    draw.ellipse([0.44 * w, 0.60 * h, 0.56 * w, 0.68 * h], fill=0)


def trousers(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Trousers whose legs run off the bottom edge of the frame, with a gap between them."""
    outline = [
        (0.28, 0.10),
        (0.72, 0.10),
        (0.80, 1.01),
        (0.55, 1.01),
        (0.50, 0.42),
        (0.45, 1.01),
        (0.20, 1.01),
    ]
    draw.polygon(_scale(outline, width, height), fill=255)


SHAPES: dict[str, Shape] = {"shirt": shirt, "dress": dress, "bag": bag, "trousers": trousers}


def coverage(shape: Shape, width: int, height: int) -> np.ndarray:
    """The fraction of each pixel the shape covers, from a 4x supersampled drawing."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    shape(ImageDraw.Draw(canvas), width, height)
    big = np.asarray(canvas, dtype=np.float32) / 255.0
    return np.asarray(big.reshape(height, s, width, s).mean(axis=(1, 3)), dtype=np.float32)


def studio_backdrop(
    width: int,
    height: int,
    colour: RGB = (236, 236, 233),
    *,
    gradient: float = 14.0,
    vignette: float = 10.0,
) -> np.ndarray:
    """A backdrop lit from above: darker towards the bottom and into the corners."""
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    # cos^4 falloff, the usual lens vignette, is not a polynomial: the model must cope
    # with a backdrop it can only approximate.
    r2 = (x * x + y * y) / 2.0
    falloff = vignette * (1.0 - np.cos(np.clip(r2, 0.0, 1.0) * 0.9) ** 4) / 0.5
    base = np.asarray(colour, dtype=np.float32)[None, None, :]
    tint = np.asarray([1.0, 0.9, 0.6], dtype=np.float32)[None, None, :]
    shade = (-gradient * 0.5 * y - 3.0 * x - falloff)[:, :, None]
    return (base + shade * tint).astype(np.float32)


def fabric(
    width: int,
    height: int,
    colour: RGB,
    rng: np.random.Generator,
    *,
    stripes: float = 0.0,
    weave: float = 5.0,
) -> np.ndarray:
    """Garment colour with fold shading, an optional stripe pattern and a fine weave."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    folds = (
        1.0
        + 0.06 * np.sin(x / 37.0 + phase[0]) * np.cos(y / 53.0 + phase[1])
        + 0.04 * np.sin((x + 2 * y) / 71.0 + phase[2])
    )
    pattern = weave * np.sin(x * 1.9) * np.sin(y * 2.3)
    if stripes:
        pattern = pattern + stripes * np.sign(np.sin(y / 9.0))
    base = np.asarray(colour, dtype=np.float32)[None, None, :]
    return np.asarray(base * folds[:, :, None] + pattern[:, :, None], dtype=np.float32)


def scene(
    shape: str,
    garment: RGB,
    *,
    width: int = 768,
    height: int = 1024,
    backdrop: RGB = (236, 236, 233),
    noise_sigma: float = 2.0,
    stripes: float = 0.0,
    seed: int = 0,
) -> Scene:
    """Compose a garment onto a studio backdrop with sensor noise; deterministic per seed."""
    rng = np.random.default_rng(seed)
    alpha = coverage(SHAPES[shape], width, height).astype(np.float32)
    bg = studio_backdrop(width, height, backdrop)
    fg = fabric(width, height, garment, rng, stripes=stripes)
    a = alpha[:, :, None]
    noise = rng.normal(0.0, noise_sigma, size=(height, width, 3)).astype(np.float32)
    pixels = np.clip(np.rint(a * fg + (1.0 - a) * bg + noise), 0, 255).astype(np.uint8)
    return Scene(
        image=Image.fromarray(pixels),
        alpha=alpha,
        backdrop=bg,
        foreground=np.clip(fg, 0, 255),
        noise_sigma=noise_sigma,
    )


STANDARD_SCENES: dict[str, Callable[[], Scene]] = {
    "navy-shirt": lambda: scene("shirt", (38, 52, 96), seed=1),
    "striped-dress": lambda: scene("dress", (176, 36, 44), stripes=22.0, seed=2),
    "green-bag": lambda: scene("bag", (52, 110, 70), seed=3),
    "grey-trousers": lambda: scene("trousers", (92, 94, 98), seed=4),
    # Within ~20 RGB units of the backdrop, less than the backdrop's own light falloff.
    "pale-shirt": lambda: scene("shirt", (222, 224, 228), seed=5),
}


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation, for keeping assertions away from edges."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
            xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
            out[yd, xd] |= mask[ys, xs]
    return out
