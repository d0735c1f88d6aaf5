"""The resize's Lanczos pass: Pillow's, as the worker runs it, against the faster kernels of
libvips and OpenCV, for speed and for how far each is from the exact filter.

Speed: the per-job benchmark's input (a 1024x1024 photo) resized to 512x512, process CPU
medians of ``--rounds``, one thread each. Accuracy: a fine checkerboard (5x7 px cells, the
kind of weave that turns to moiré) shrunk 2x and 2.5x, each result's mean distance in levels
from Lanczos-3 computed exactly in float64 (Pillow's pixel centres and kernel widening, no
rounding or clipping between the passes, which is why Pillow's own two 8-bit passes are
some way from it at 2x, where Lanczos' ringing on hard edges is clipped in between).

* libvips (``pyvips``, optional): ``reduce`` on 8-bit pixels, its fast path, and on floats.
* OpenCV (``cv2``, optional): the same 12 taps as Pillow's at a whole factor, as two
  separable ``filter2D`` passes and a decimation (whole factors only).

Neither is a dependency of the platform; a missing one is left out.

    python bench/resize_kernels.py

It prints one ``SUMMARY resize_kernels:`` line; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np
from PIL import Image

Kernel = Callable[[np.ndarray, tuple[int, int]], np.ndarray | None]


def _lanczos3(t: np.ndarray) -> np.ndarray:
    return np.where(np.abs(t) < 3, np.sinc(t) * np.sinc(t / 3), 0.0)  # type: ignore[no-any-return]


def _exact_axis(src: np.ndarray, out: int) -> np.ndarray:
    """Lanczos-3 along the last axis, as Pillow places and widens it, in float64."""
    n = src.shape[-1]
    scale = n / out
    support = 3 * max(scale, 1.0)
    result = np.empty((*src.shape[:-1], out))
    for i in range(out):
        centre = (i + 0.5) * scale
        lo, hi = max(0, int(centre - support + 0.5)), min(n, int(centre + support + 0.5))
        weights = _lanczos3((np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0))
        result[..., i] = src[..., lo:hi] @ (weights / weights.sum())
    return result


def exact(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    across = _exact_axis(pixels.astype(np.float64), size[0])
    return np.clip(_exact_axis(across.swapaxes(0, 1), size[1]).swapaxes(0, 1), 0, 255)


def pillow(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    resized = Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized)


def _vips(fmt: str) -> Kernel | None:
    try:
        import pyvips  # type: ignore[import-not-found]
    except (ImportError, OSError):
        return None
    pyvips.concurrency_set(1)
    pyvips.cache_set_max(0)

    def run(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        height, width = pixels.shape[:2]
        bands = 1 if pixels.ndim == 2 else pixels.shape[2]
        image = pyvips.Image.new_from_memory(pixels.tobytes(), width, height, bands, "uchar")
        if fmt != "uchar":
            image = image.cast(fmt)
        out = image.reduce(width / size[0], height / size[1], kernel="lanczos3")
        if fmt != "uchar":
            out = (out + 0.5).cast("uchar")
        shape = (out.height, out.width) if bands == 1 else (out.height, out.width, bands)
        return np.ndarray(shape, np.uint8, out.write_to_memory())

    return run


def _opencv() -> Kernel | None:
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)

    def run(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
        factor = pixels.shape[1] / size[0]
        if factor != int(factor) or pixels.shape[0] / size[1] != factor:
            return None
        f = int(factor)
        # Output pixel i's taps as Pillow places them (centre (i + 0.5) * f), from f * i.
        taps = np.arange(math.floor(f / 2 - 3 * f + 0.5), math.floor(f / 2 + 3 * f + 0.5))
        weights = _lanczos3((taps - f / 2 + 0.5) / f)
        weights = (weights / weights.sum()).astype(np.float32)
        anchor = int(-taps[0])
        across = cv2.filter2D(
            pixels,
            cv2.CV_32F,
            weights[None, :],
            anchor=(anchor, 0),
            borderType=cv2.BORDER_REPLICATE,
        )[:, ::f][:, : size[0]]
        down = cv2.filter2D(
            np.ascontiguousarray(across),
            cv2.CV_32F,
            weights[:, None],
            anchor=(0, anchor),
            borderType=cv2.BORDER_REPLICATE,
        )[::f][: size[1]]
        return np.clip(down + 0.5, 0, 255).astype(np.uint8)

    return run


def _cpu_ms(kernel: Kernel, pixels: np.ndarray, size: tuple[int, int], rounds: int) -> float:
    kernel(pixels, size)
    times = []
    for _ in range(rounds):
        start = time.process_time()
        kernel(pixels, size)
        times.append(time.process_time() - start)
    return round(1000 * statistics.median(times), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    kernels: dict[str, Kernel] = {"pillow": pillow}
    for name, kernel in (
        ("libvips_uchar", _vips("uchar")),
        ("libvips_float", _vips("float")),
        ("opencv_separable", _opencv()),
    ):
        if kernel is not None:
            kernels[name] = kernel
    photo = np.asarray(Image.open(io.BytesIO(h.photo_png(1024, 1024, seed=1))).convert("RGB"))
    y, x = np.mgrid[0:1000, 0:1000]
    weave = (((x // 5 + y // 7) % 2) * 255).astype(np.uint8)
    references = {side: exact(weave, (side, side)) for side in (500, 400)}
    results: dict[str, Any] = {}
    for name, kernel in kernels.items():
        row: dict[str, Any] = {
            "cpu_ms_1024_to_512": _cpu_ms(kernel, photo, (512, 512), args.rounds)
        }
        for side, reference in references.items():
            out = kernel(weave, (side, side))
            key = f"mean_levels_from_exact_{1000 // side if side == 500 else 2.5}x"
            row[key] = None if out is None else round(float(np.abs(out - reference).mean()), 3)
        results[name] = row
        print(f"{name}: {row}", file=sys.stderr)
    if args.out:
        report = {"kernels": results, "machine": h.machine()}
        args.out.write_text(json.dumps(report, indent=2))
    parts = []
    for name, row in results.items():
        errors = "/".join("-" if v is None else f"{v:.2f}" for k, v in row.items() if "mean" in k)
        parts.append(f"{name}={row['cpu_ms_1024_to_512']:.1f}ms,err2x/2.5x={errors}")
    print("SUMMARY resize_kernels: " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
