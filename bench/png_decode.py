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
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np

from hiddenmodel import images

GHOST_EVAL = Path(__file__).resolve().parents[2] / "shared" / "ghost-eval"


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
    if GHOST_EVAL.is_dir():
        for path in sorted(GHOST_EVAL.glob("*.png")):
            if ".retouched" not in path.name:
                inputs[path.stem] = path.read_bytes()
    rows: dict[str, Any] = {}
    for name, data in inputs.items():
        digest = hashlib.sha256(data).hexdigest()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for stored in (False, True):
                times[stored].append(_decode(data, digest, stored)[0])
        same = np.array_equal(
            np.asarray(_decode(data, digest, True)[1]), np.asarray(_decode(data, digest, False)[1])
        )
        rows[name] = {
            "bytes": len(data),
            "pillow_ms": round(statistics.median(times[False]), 2),
            "isal_stored_ms": round(statistics.median(times[True]), 2),
            "same_pixels": same,
        }
        print(f"{name}: {rows[name]}", file=sys.stderr)
    ratios = [r["isal_stored_ms"] / r["pillow_ms"] for r in rows.values()]
    first = next(iter(rows.values()))
    result = {"rounds": args.rounds, "inputs": rows, "machine": h.machine()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(
        f"SUMMARY png_decode: benchmark_input pillow={first['pillow_ms']:.1f}ms "
        f"isal_stored={first['isal_stored_ms']:.1f}ms median_ratio={statistics.median(ratios):.2f} "
        f"inputs={len(rows)} all_same_pixels={all(r['same_pixels'] for r in rows.values())}"
    )
    return 0 if all(r["same_pixels"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
