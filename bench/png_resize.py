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
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np

from hiddenmodel import images
from workers.pipelines.resize import resize

GHOST_EVAL = Path(__file__).resolve().parents[2] / "shared" / "ghost-eval"


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
    if GHOST_EVAL.is_dir():
        for path in sorted(GHOST_EVAL.glob("*.png")):
            if ".retouched" not in path.name:
                data = path.read_bytes()
                width, height = images.inspect_image(data).display_size
                inputs[path.stem] = (data, (max(1, width // 2), max(1, height // 2)))
    rows: dict[str, Any] = {}
    for name, (data, box) in inputs.items():
        digest = hashlib.sha256(data).hexdigest()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for plain in (False, True):
                times[plain].append(_run(data, digest, box, plain)[0])
        decoded, plain_out = (_run(data, digest, box, p)[1] for p in (False, True))
        rows[name] = {
            "bytes": len(data),
            "box": box,
            "plain_png": isinstance(
                images.decode_image_or_plain_png(data, validated_sha256=digest), images.PlainPng
            ),
            "decoded_ms": round(statistics.median(times[False]), 2),
            "plain_ms": round(statistics.median(times[True]), 2),
            "same_output": decoded.mode == plain_out.mode
            and np.array_equal(np.asarray(decoded), np.asarray(plain_out)),
        }
        print(f"{name}: {rows[name]}", file=sys.stderr)
    ratios = [r["plain_ms"] / r["decoded_ms"] for r in rows.values()]
    first = next(iter(rows.values()))
    result = {"rounds": args.rounds, "inputs": rows, "machine": h.machine()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(
        f"SUMMARY png_resize: benchmark_input decoded={first['decoded_ms']:.1f}ms "
        f"plain={first['plain_ms']:.1f}ms ratio={first['plain_ms'] / first['decoded_ms']:.2f} "
        f"inputs={len(rows)} median_ratio={statistics.median(ratios):.2f} "
        f"same_output={all(r['same_output'] for r in rows.values())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
