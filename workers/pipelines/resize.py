"""Resizing product images to a requested box: fit, fill (cover and crop) or exact."""

from __future__ import annotations

from typing import Final, Literal

from PIL import Image

ResizeMode = Literal["fit", "fill", "exact"]

# Beyond these an "upscale" only invents pixels: the result would be blur, sold as detail.
MAX_UPSCALE: Final = 4.0
MAX_SIDE: Final = 6000

# Pillow first shrinks by an integer factor with a box filter, then resamples the last
# factor of at most this much with Lanczos; at 3 the result is indistinguishable from a
# full Lanczos pass on large reductions and several times faster.
_REDUCING_GAP: Final = 3.0


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
    image: Image.Image,
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
    """
    if width is None and height is None:
        raise ValueError("give a width, a height or both")
    for name, value in (("width", width), ("height", height)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if mode not in ("fit", "fill", "exact"):
        raise ValueError(f"mode must be 'fit', 'fill' or 'exact', not {mode!r}")

    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    w0, h0 = image.size
    box_w, box_h, derived = _target_box(image.size, width, height)

    if mode == "exact" or derived:
        _check_output((box_w, box_h), box_w / w0, box_h / h0)
        return image.resize((box_w, box_h), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)

    if mode == "fill":
        scale = max(box_w / w0, box_h / h0)
        _check_output((box_w, box_h), scale, scale)
        # Crop in source coordinates and resample once: the box is exactly centred (to a
        # fraction of a source pixel) and no pixel is resampled twice.
        crop_w, crop_h = box_w / scale, box_h / scale
        left, top = (w0 - crop_w) / 2.0, (h0 - crop_h) / 2.0
        return image.resize(
            (box_w, box_h),
            Image.Resampling.LANCZOS,
            box=(left, top, left + crop_w, top + crop_h),
            reducing_gap=_REDUCING_GAP,
        )

    scale = min(box_w / w0, box_h / h0)
    new_w = min(box_w, max(1, round(w0 * scale)))
    new_h = min(box_h, max(1, round(h0 * scale)))
    out_size = (box_w, box_h) if background is not None else (new_w, new_h)
    _check_output(out_size, new_w / w0, new_h / h0)
    fitted = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    if background is None or (new_w, new_h) == (box_w, box_h):
        return fitted

    has_alpha = fitted.mode in ("RGBA", "LA")
    canvas_mode = "RGBA" if has_alpha else "RGB"
    fill = (*background, 0) if has_alpha else background
    canvas = Image.new(canvas_mode, (box_w, box_h), fill)
    offset = ((box_w - new_w) // 2, (box_h - new_h) // 2)
    canvas.paste(fitted.convert(canvas_mode), offset)
    return canvas
