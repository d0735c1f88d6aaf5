"""PNG decode on the worker's path: Pillow's own inflate against ISA-L's (``_png_stored``).

Decodes the per-job benchmark's input (a 1024x1024 photo PNG of about 1.67 MB) and, when
``../shared/ghost-eval`` is there, its photos, through ``images.decode_image`` as a worker
does (the digest of the validated bytes given, so the chunk walk is skipped), once with the
image data inflated by ISA-L and handed to Pillow stored, once as Pillow reads the file. The
two are alternated, ``--rounds`` times each; process CPU medians, and whether the pixels
are the same.

    python bench/png_decode.py

It prints one ``SUMMARY png_decode:`` line; ``--out`` writes everything as JSON.
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


def _decode(data: bytes, digest: str, stored: bool) -> tuple[float, Any]:
    original = images._png_stored
    if not stored:
        images._png_stored = lambda *args: None  # type: ignore[assignment]
    try:
        start = time.process_time()
        image = images.decode_image(data, validated_sha256=digest)
        return 1000 * (time.process_time() - start), image
    finally:
        images._png_stored = original  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    inputs = {"benchmark input 1024x1024": h.photo_png(1024, 1024, seed=1)}
    inputs.update(h.ghost_eval_photos())
    rows: dict[str, Any] = {}
    for name, data in inputs.items():
        digest = hashlib.sha256(data).hexdigest()
        pillow, stored, original, copy = h.alternated(
            args.rounds,
            partial(_decode, data, digest, False),
            partial(_decode, data, digest, True),
        )
        rows[name] = {
            "bytes": len(data),
            "pillow_ms": pillow,
            "isal_stored_ms": stored,
            "same_pixels": np.array_equal(np.asarray(original), np.asarray(copy)),
        }
    return h.report_alternated(
        "png_decode", rows, ("pillow_ms", "isal_stored_ms", "same_pixels"), args
    )


if __name__ == "__main__":
    sys.exit(main())
