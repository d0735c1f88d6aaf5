"""Resizing product images to a requested box: fit, fill (cover and crop) or exact."""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import cache
from typing import Any, Final, Literal

from PIL import Image

from hiddenmodel.images import PlainPng

ResizeMode = Literal["fit", "fill", "exact"]

log = logging.getLogger(__name__)

# Beyond these an "upscale" only invents pixels: the result would be blur, sold as detail.
MAX_UPSCALE: Final = 4.0
MAX_SIDE: Final = 6000

# Pillow first shrinks by an integer factor with a box filter, then resamples the last
# factor of at most this much with Lanczos; at 3 the result is indistinguishable from a
# full Lanczos pass on large reductions and several times faster.
_REDUCING_GAP: Final = 3.0
# Lanczos' support is 3 source pixels a side at scale 1; Pillow widens the reduced region by
# this much less a half pixel (PIL.Image._get_safe_box).
_LANCZOS_SUPPORT: Final = 3.0
# Outputs this tall and taller are resampled as two bands of rows, one on a second thread
# (Pillow's resampling releases the GIL): a 1024² → 512² resize takes 6 ms instead of 10 when
# a core is free. Only where the bands can meet on a whole source row, so that each band's
# scale is the whole image's to the last bit and its rows are exactly the ones a single pass
# writes; at other scales (1024 → 683, say) the rows would round differently by a level or
# a few, and the resize is one pass.
_BAND_MIN_ROWS: Final = 128

# Reductions of a whole image of 8-bit bands go through libvips' Lanczos 3, which is
# vectorised: 1024² → 512² RGB in 5 ms of CPU where Pillow takes 13, every pixel within two
# levels of Pillow's. Enlargements, crops to a fractional box and other modes stay Pillow's.
# libvips is loaded on first use, in the process that resizes: a Celery pool child, never the
# parent it forks from (libvips' threads do not survive a fork).
_VIPS_BANDS: Final = {"L": 1, "La": 2, "RGB": 3, "RGBa": 4}

_band_pool: tuple[int, ThreadPoolExecutor] | None = None
_band_pool_lock = threading.Lock()


def _band_executor() -> ThreadPoolExecutor:
    """One thread for second bands, per process (a pool made before a fork has no thread)."""
    global _band_pool
    with _band_pool_lock:
        if _band_pool is None or _band_pool[0] != os.getpid():
            _band_pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="resize-band"))
        return _band_pool[1]


@cache
def _libvips() -> Any:
    """The pyvips module with its operation cache off, or None where libvips is missing."""
    try:
        import pyvips
    except (ImportError, OSError):  # pragma: no cover - no libvips for this platform
        return None
    # The cache would keep each input image alive for the next resize of the same size,
    # which never comes: one job, one image.
    pyvips.cache_set_max(0)
    # libvips' own info messages (the mask it chose, its threads) reach Python's logging at
    # INFO: seven lines a resize in a worker's log. Its warnings still come through.
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    return pyvips


def _vips_reduce(image: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """The whole ``image`` reduced to ``size`` by libvips' Lanczos 3, with Pillow's reducing
    gap; None where it does not apply (an enlargement on either side, a mode it is not used
    for, no libvips)."""
    bands = _VIPS_BANDS.get(image.mode)
    width, height = size
    if bands is None or width > image.width or height > image.height:
        return None
    vips = _libvips()
    if vips is None:
        return None
    try:
        source = vips.Image.new_from_memory(
            image.tobytes(), image.width, image.height, bands, "uchar"
        )
        reduced = source.resize(
            width / image.width, vscale=height / image.height, kernel="lanczos3", gap=_REDUCING_GAP
        )
        pixels = reduced.write_to_memory()
    except vips.Error as exc:
        # libvips refusing a valid image is its fault, not the job's: Pillow does it instead.
        log.warning(
            "libvips could not reduce %s %s to %s, Pillow will: %s",
            image.mode,
            image.size,
            size,
            exc,
        )
        return None
    if (reduced.width, reduced.height) != size:  # pragma: no cover - libvips rounds to size
        return None
    out = Image.frombytes(image.mode, size, pixels)
    out.info = dict(image.info)  # as Image.resize keeps it: the ICC profile goes on
    return out


def _vips_reduce_png(png: PlainPng, size: tuple[int, int]) -> Image.Image | None:
    """:func:`_vips_reduce` of ``png.decode()``, read by libvips as it reduces: no decoded
    copy of the whole image is made in Pillow's layout and packed again for libvips. The
    same pixels (libvips' PNG reader and Pillow's unfilter the same rows); None where it
    does not apply or libvips refuses, for the caller to decode the image instead."""
    width, height = size
    if width > png.width or height > png.height:
        return None
    vips = _libvips()
    if vips is None:
        return None
    try:
        # Any warning (a CRC, a short row) is an error here: Pillow then decodes the
        # image, and says what is wrong with it. Read from the stored copy in place: a
        # buffer would be copied into libvips first (3 MB for a 1024x1024 photo).
        source = vips.Image.new_from_source(
            vips.Source.new_from_memory(png.stored), "", access="sequential", fail_on="warning"
        )
        if (source.width, source.height, source.bands, source.format) != (
            png.width,
            png.height,
            3,
            "uchar",
        ):
            return None
        reduced = source.resize(
            width / png.width, vscale=height / png.height, kernel="lanczos3", gap=_REDUCING_GAP
        )
        pixels = reduced.write_to_memory()
    except vips.Error as exc:
        log.warning("libvips could not read and reduce a PNG to %s, Pillow will: %s", size, exc)
        return None
    if (reduced.width, reduced.height) != size:  # pragma: no cover - libvips rounds to size
        return None
    out = Image.frombytes("RGB", size, pixels)
    out.info = dict(png.info)
    return out


def _first_band_rows(span: float, height: int) -> int | None:
    """The first band's output rows, as near half as may be, for which the bands meet on a
    whole number of source rows (``rows * span / height`` an integer); None when no such
    split lies in the middle half, or the output is too short to split."""
    if height < _BAND_MIN_ROWS:
        return None
    exact = Fraction(span)
    # rows * p / (q * height) is whole exactly for the multiples of this step:
    step = exact.denominator * height // math.gcd(exact.numerator, exact.denominator * height)
    rows = round(height / 2 / step) * step
    return rows if height // 4 <= rows <= height - height // 4 else None


def _lanczos(
    image: Image.Image | PlainPng,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """``image.resize(size, LANCZOS, box=box, reducing_gap=_REDUCING_GAP)``: a reduction of
    the whole image by libvips (see :data:`_VIPS_BANDS`); otherwise Pillow's, its final
    Lanczos pass in two bands of rows when the output is tall enough (see
    :data:`_BAND_MIN_ROWS`).

    Pillow's own steps, each done once for the whole box so that both bands resample the same
    pixels: alpha premultiplied before and undone after, and the integer reduction when the
    scale calls for one.

    A :class:`PlainPng` is read and reduced by libvips in one pass where it can be
    (:func:`_vips_reduce_png`), and decoded first otherwise.
    """
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, *image.size)
    if isinstance(image, PlainPng):
        if (x0, y0, x1, y1) == (0, 0, *image.size):
            reduced = _vips_reduce_png(image, size)
            if reduced is not None:
                return reduced
        image = image.decode()
    if size == image.size and (x0, y0, x1, y1) == (0, 0, *image.size):
        return image.copy()
    premultiplied = {"RGBA": "RGBa", "LA": "La"}.get(image.mode)
    if premultiplied is not None:
        straight = image.mode
        out = _lanczos(image.convert(premultiplied), size, (x0, y0, x1, y1)).convert(straight)
        out.info = dict(image.info)
        return out
    if (x0, y0, x1, y1) == (0, 0, *image.size):
        reduced = _vips_reduce(image, size)
        if reduced is not None:
            return reduced
    width, height = size
    factor_x = int((x1 - x0) / width / _REDUCING_GAP) or 1
    factor_y = int((y1 - y0) / height / _REDUCING_GAP) or 1
    if factor_x > 1 or factor_y > 1:
        support_x = (_LANCZOS_SUPPORT - 0.5) * (x1 - x0) / width
        support_y = (_LANCZOS_SUPPORT - 0.5) * (y1 - y0) / height
        safe = (
            max(0, int(x0 - support_x)),
            max(0, int(y0 - support_y)),
            min(image.width, math.ceil(x1 + support_x)),
            min(image.height, math.ceil(y1 + support_y)),
        )
        image = image.reduce((factor_x, factor_y), box=safe)
        x0, x1 = (x0 - safe[0]) / factor_x, (x1 - safe[0]) / factor_x
        y0, y1 = (y0 - safe[1]) / factor_y, (y1 - safe[1]) / factor_y
    lanczos = Image.Resampling.LANCZOS
    rows = _first_band_rows(y1 - y0, height)
    split = y0 + rows * (y1 - y0) / height if rows else y0
    # Whole in exact arithmetic is not enough: the float split must be it, or the bands'
    # scales differ from the whole's in the last bit.
    if not rows or split - y0 != rows * Fraction(y1 - y0) / height:
        return image.resize(size, lanczos, box=(x0, y0, x1, y1))
    first = _band_executor().submit(image.resize, (width, rows), lanczos, (x0, y0, x1, split))
    second = image.resize((width, height - rows), lanczos, box=(x0, split, x1, y1))
    out = Image.new(image.mode, size)
    out.info = dict(image.info)  # as Image.resize keeps it: the ICC profile goes on
    out.paste(first.result(), (0, 0))
    out.paste(second, (0, rows))
    return out


def _target_box(
    size: tuple[int, int], width: int | None, height: int | None
) -> tuple[int, int, bool]:
    """The requested box; a missing side follows the image's aspect ratio (and is flagged)."""
    w0, h0 = size
    if width is not None and height is not None:
        return width, height, False
    if width is not None:
        return width, max(1, round(h0 * width / w0)), True
    assert height is not None
    return max(1, round(w0 * height / h0)), height, True


def _check_output(size: tuple[int, int], scale_x: float, scale_y: float) -> None:
    if max(scale_x, scale_y) > MAX_UPSCALE:
        raise ValueError(
            f"resizing to {size[0]}x{size[1]} would enlarge the image "
            f"{max(scale_x, scale_y):.2f} times; at most {MAX_UPSCALE:g} times is allowed"
        )
    if max(size) > MAX_SIDE:
        raise ValueError(
            f"resizing to {size[0]}x{size[1]} exceeds the {MAX_SIDE} px limit on either side"
        )


def resize(
    image: Image.Image | PlainPng,
    *,
    width: int | None,
    height: int | None,
    mode: ResizeMode,
    background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Resize with Lanczos into a ``width`` x ``height`` box, keeping any alpha channel.

    - ``fit``: as large as fits inside the box, aspect ratio kept. With ``background`` the
      result is padded to exactly the box, centred; padding is that colour, and fully
      transparent when the image has alpha so a cut-out stays a cut-out.
    - ``fill``: covers the box, aspect ratio kept, then the overflow is cropped equally
      from both sides.
    - ``exact``: stretched to the box.

    Either side may be omitted; it then follows the aspect ratio, so every mode scales the
    image to the given side. Enlarging more than 4x, or past 6000 px on a side, raises
    ``ValueError``.

    ``image`` may be a :class:`PlainPng` (``decode_image_or_plain_png``): a reduction of the
    whole image then reads it with libvips as it reduces it; anything else decodes it first.
    Either way the result is the one its decoded image gives.
    """
    if width is None and height is None:
        raise ValueError("give a width, a height or both")
    for name, value in (("width", width), ("height", height)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if mode not in ("fit", "fill", "exact"):
        raise ValueError(f"mode must be 'fit', 'fill' or 'exact', not {mode!r}")

    if isinstance(image, Image.Image) and image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    w0, h0 = image.size
    box_w, box_h, derived = _target_box(image.size, width, height)

    if mode == "exact" or derived:
        _check_output((box_w, box_h), box_w / w0, box_h / h0)
        return _lanczos(image, (box_w, box_h))

    if mode == "fill":
        scale = max(box_w / w0, box_h / h0)
        _check_output((box_w, box_h), scale, scale)
        # Crop in source coordinates and resample once: the box is exactly centred (to a
        # fraction of a source pixel) and no pixel is resampled twice. On the side that
        # fits, the division gives back the source's side only to the last bit: a hair
        # more would put the box a hair outside the image, which Pillow refuses.
        crop_w, crop_h = min(w0, box_w / scale), min(h0, box_h / scale)
        left, top = (w0 - crop_w) / 2.0, (h0 - crop_h) / 2.0
        return _lanczos(image, (box_w, box_h), (left, top, left + crop_w, top + crop_h))

    scale = min(box_w / w0, box_h / h0)
    new_w = min(box_w, max(1, round(w0 * scale)))
    new_h = min(box_h, max(1, round(h0 * scale)))
    out_size = (box_w, box_h) if background is not None else (new_w, new_h)
    _check_output(out_size, new_w / w0, new_h / h0)
    fitted = _lanczos(image, (new_w, new_h))
    if background is None or (new_w, new_h) == (box_w, box_h):
        return fitted

    has_alpha = fitted.mode in ("RGBA", "LA")
    canvas_mode = "RGBA" if has_alpha else "RGB"
    fill = (*background, 0) if has_alpha else background
    canvas = Image.new(canvas_mode, (box_w, box_h), fill)
    offset = ((box_w - new_w) // 2, (box_h - new_h) // 2)
    canvas.paste(fitted.convert(canvas_mode), offset)
    return canvas
