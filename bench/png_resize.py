"""A resize job's CPU work on a PNG: decoded by Pillow then reduced, against read by libvips.

The worker's two ways for a resize's input, from the stored bytes to the reduced image, with
the digest of the validated bytes given as a worker has it:

* ``decoded``: ``images.decode_image`` (Pillow's unfilter of the ISA-L stored copy), then
  ``resize``, which packs Pillow's pixels again for libvips' reduction;
* ``plain``: ``images.decode_image_or_plain_png``, then ``resize``, where libvips reads the
  stored copy and reduces it in one pass (plain 8-bit RGB PNGs only; other inputs take the
  first way in both).

Inputs: the per-job benchmark's photo (1024x1024, about 1.67 MB) fitted to 512x512, and,
when ``../shared/ghost-eval`` is there, its photos fitted to half their size. The two ways
are alternated ``--rounds`` times each; process CPU medians (libvips' threads included),
and whether the outputs are the same.

    python bench/png_resize.py

It prints one ``SUMMARY png_resize:`` line; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np

from hiddenmodel import images
from workers.pipelines.resize import resize


def _run(data: bytes, digest: str, box: tuple[int, int], plain: bool) -> tuple[float, Any]:
    decode = images.decode_image_or_plain_png if plain else images.decode_image
    start = time.process_time()
    source = decode(data, validated_sha256=digest)
    out = resize(source, width=box[0], height=box[1], mode="fit")
    return 1000 * (time.process_time() - start), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    inputs = {"benchmark input 1024x1024": (h.photo_png(1024, 1024, seed=1), (512, 512))}
    for name, data in h.ghost_eval_photos().items():
        width, height = images.inspect_image(data).display_size
        inputs[name] = (data, (max(1, width // 2), max(1, height // 2)))
    rows: dict[str, Any] = {}
    for name, (data, box) in inputs.items():
        digest = hashlib.sha256(data).hexdigest()
        decoded_ms, plain_ms, decoded, plain = h.alternated(
            args.rounds,
            partial(_run, data, digest, box, False),
            partial(_run, data, digest, box, True),
        )
        rows[name] = {
            "bytes": len(data),
            "box": box,
            "plain_png": isinstance(
                images.decode_image_or_plain_png(data, validated_sha256=digest), images.PlainPng
            ),
            "decoded_ms": decoded_ms,
            "plain_ms": plain_ms,
            "same_output": decoded.mode == plain.mode
            and np.array_equal(np.asarray(decoded), np.asarray(plain)),
        }
    return h.report_alternated("png_resize", rows, ("decoded_ms", "plain_ms", "same_output"), args)


if __name__ == "__main__":
    sys.exit(main())
