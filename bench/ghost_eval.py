"""Ghost-mannequin quality on a folder of real photos, and on a hard synthetic set.

For every photo it runs the ``ghost_mannequin`` operation as the worker does (same
preparation, same compositing, same quality report) and writes a contact sheet
``<out>/<name>.png``: input | garment (green) and body (red) over the input | hidden regions
(neck blue, sleeves yellow, hem magenta) | output. Then it prints a table, one line per photo:

- ``iou``: the output alpha against ground truth, when there is one. Ground truth is a
  retouched after-image beside the photo (``NAME.retouched.png``, pixel-aligned; the garment
  is where it is not white) or a mask (``NAME.mask.png``, white = garment).
- ``int_rec`` / ``int_prec``: recall and precision of the hidden (inner) regions, for the
  synthetic set whose hidden regions are known.
- ``type``, ``openings`` (n/s/h = neck, sleeves, hem), ``review`` with its reasons, the
  refusal if the photo was refused, and the time the preparation took.

The inpainter is a weight-free stand-in by default (``prefill``: the hidden regions keep the
shaded garment colour the pipeline paints before inpainting), which is what geometry and
segmentation are judged on; ``--model DIR`` runs the real SDXL runtime from ``DIR`` instead.
The last line is a one-line summary.

Run from the repository root::

    python bench/ghost_eval.py ../shared/ghost-eval --out var/ghost-eval
    python bench/ghost_eval.py --synthetic --out var/ghost-eval-synthetic
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from workers.pipelines.contracts import (  # noqa: E402
    Inpainter,
    InpaintRequest,
    InpaintResult,
    ProgressCallback,
)
from workers.pipelines.ghost.pipeline import (  # noqa: E402
    GhostParams,
    NotAGhostPhoto,
    finish_ghost,
    prepare_ghost,
)

Mask = NDArray[np.bool_]


class PrefillInpainter:
    """Returns the request's image unchanged: the pipeline's own shaded prefill stays."""

    def inpaint(
        self, request: InpaintRequest, progress: ProgressCallback | None = None
    ) -> InpaintResult:
        return InpaintResult(request.image.convert("RGB"), 0.0)

    def inpaint_batch(
        self, requests: Sequence[InpaintRequest], progress: ProgressCallback | None = None
    ) -> list[InpaintResult]:
        return [self.inpaint(r, progress) for r in requests]


@dataclass
class Case:
    name: str
    image: NDArray[np.uint8]
    truth_alpha: Mask | None = None  # at the photo's size
    truth_hidden: Mask | None = None
    expect_refusal: bool = False


@dataclass
class Row:
    name: str
    iou: float | None
    interior_recall: float | None
    interior_precision: float | None
    garment_type: str
    openings: str
    needs_review: bool
    reasons: str
    refused: str
    seconds: float


def _truth_from_retouched(path: Path) -> Mask:
    arr = np.asarray(Image.open(path).convert("RGB"), np.int16)
    ink = (255 - arr).max(axis=2) > 12
    # The retoucher's white parts inside the silhouette are garment too.
    _, labels = cv2.connectedComponents((~ink).astype(np.uint8), connectivity=4)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    holes = ~ink & ~np.isin(labels, list(border))
    return np.asarray(ink | holes)


def real_cases(folder: Path) -> Iterator[Case]:
    for path in sorted(folder.glob("*.png")):
        if path.name.endswith((".retouched.png", ".mask.png", ".output.png")):
            continue
        name = path.stem
        image = np.asarray(Image.open(path).convert("RGB"), np.uint8)
        truth = None
        retouched = path.with_name(f"{name}.retouched.png")
        mask = path.with_name(f"{name}.mask.png")
        if retouched.exists():
            truth = _truth_from_retouched(retouched)
        elif mask.exists():
            truth = np.asarray(Image.open(mask).convert("L")) >= 128
        yield Case(name, image, truth)


def synthetic_cases(seeds: int) -> Iterator[Case]:
    from tests.garments import HARD_SCENES, make_hard_scene

    for name in HARD_SCENES:
        for seed in range(seeds):
            scene = make_hard_scene(name, seed=seed)
            refuse = bool(scene.extras.get("refuse", False))
            yield Case(
                f"{name}-{seed}",
                scene.image,
                None if refuse else scene.garment | scene.hidden,
                None if refuse else scene.hidden,
                refuse,
            )


def _resize_mask(mask: Mask, size: tuple[int, int]) -> Mask:
    m = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return np.asarray(m >= 0.5)


def _iou(a: Mask, b: Mask) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def _tint(rgb: NDArray[np.uint8], layers: Sequence[tuple[Mask, tuple[int, int, int]]]) -> Image:
    out = rgb.astype(np.float32) * 0.55 + 255 * 0.45
    for mask, colour in layers:
        out[mask] = out[mask] * 0.35 + np.asarray(colour, np.float32) * 0.65
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def contact_sheet(panels: Sequence[tuple[str, Image.Image]], path: Path) -> None:
    """Panels in a row (portrait photos) or two rows (landscape), each with its label."""
    w, h = panels[0][1].size
    cols = len(panels) if h >= w or len(panels) < 4 else (len(panels) + 1) // 2
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (w * cols, (h + 18) * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, panel) in enumerate(panels):
        x, y = (i % cols) * w, (i // cols) * (h + 18)
        sheet.paste(panel.convert("RGB").resize((w, h)), (x, y + 18))
        draw.text((x + 4, y + 3), label, fill=(0, 0, 0))
    sheet.save(path)


def run_case(case: Case, inpainter: Inpainter, params: GhostParams, out: Path) -> Row:
    started = time.perf_counter()
    try:
        job = prepare_ghost(case.image, params=params)
    except NotAGhostPhoto as exc:
        seconds = time.perf_counter() - started
        src = Image.fromarray(case.image, "RGB")
        contact_sheet([("input (refused)", src)], out / f"{case.name}.png")
        return Row(case.name, None, None, None, "-", "-", False, "", exc.code, seconds)
    seconds = time.perf_counter() - started
    result = inpainter.inpaint(job.request) if job.request is not None else None
    ghost = finish_ghost(job, result)
    report = ghost.report
    size = (job.work.shape[1], job.work.shape[0])
    alpha = np.asarray(ghost.alpha) >= 128
    iou = None
    if case.truth_alpha is not None:
        iou = _iou(alpha, _resize_mask(case.truth_alpha, size))
    rec = prec = None
    if case.truth_hidden is not None:
        truth = _resize_mask(case.truth_hidden, size)
        hidden = job.hidden
        rec = float((hidden & truth).sum()) / max(int(truth.sum()), 1)
        prec = float((hidden & truth).sum()) / max(int(hidden.sum()), 1)
    kinds = [str(o["kind"]) for o in report["openings"]]  # type: ignore[attr-defined]
    openings = f"{kinds.count('neck')}/{kinds.count('sleeve')}/{kinds.count('hem')}"
    work = np.asarray(Image.fromarray(case.image, "RGB").resize(size), np.uint8)
    seg, regions = job.segmentation, job.regions
    panels = [
        ("input", Image.fromarray(work, "RGB")),
        ("garment / body", _tint(work, [(seg.garment, (0, 170, 0)), (seg.body, (220, 0, 0))])),
        (
            "hidden regions",
            _tint(
                work,
                [
                    (seg.garment, (200, 200, 200)),
                    (regions.neck, (0, 60, 255)),
                    (regions.sleeves, (230, 200, 0)),
                    (regions.hem, (230, 0, 200)),
                ],
            ),
        ),
        ("output" + (" (review)" if report["needs_review"] else ""), ghost.image),
    ]
    contact_sheet(panels, out / f"{case.name}.png")
    ghost.image.save(out / f"{case.name}.output.png")
    return Row(
        case.name,
        iou,
        rec,
        prec,
        str(report["garment_type"]),
        openings,
        bool(report["needs_review"]),
        "; ".join(str(r) for r in report["reasons"]),  # type: ignore[attr-defined]
        "",
        seconds,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="folder of photos (*.png)")
    parser.add_argument("--synthetic", action="store_true", help="run the hard synthetic set")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per synthetic scene")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "ghost-eval")
    parser.add_argument("--size", type=int, default=768, help="working long side")
    parser.add_argument("--model", type=Path, help="SDXL inpainting folder (default: prefill)")
    args = parser.parse_args(argv)
    if args.folder is None and not args.synthetic:
        parser.error("give a folder of photos, --synthetic, or both")
    args.out.mkdir(parents=True, exist_ok=True)

    inpainter: Inpainter = PrefillInpainter()
    if args.model is not None:
        from workers.models import get_runtime

        inpainter = get_runtime(args.model)
    params = GhostParams(size=args.size, steps=20)
    cases: list[Case] = []
    if args.folder is not None:
        cases += list(real_cases(args.folder))
    if args.synthetic:
        cases += list(synthetic_cases(args.seeds))

    rows = [run_case(case, inpainter, params, args.out) for case in cases]
    print(
        f"{'photo':32} {'iou':>6} {'int_rec':>7} {'int_prec':>8} {'type':9} {'n/s/h':6} "
        f"{'review':6} {'s':>5}  reasons / refusal"
    )
    for r in rows:
        print(
            f"{r.name:32} {_fmt(r.iou):>6} {_fmt(r.interior_recall):>7} "
            f"{_fmt(r.interior_precision):>8} {r.garment_type:9} {r.openings:6} "
            f"{'yes' if r.needs_review else 'no':6} {r.seconds:5.2f}  {r.refused or r.reasons}"
        )
    ious = [r.iou for r in rows if r.iou is not None]
    refused = sum(bool(r.refused) for r in rows)
    flagged = sum(r.needs_review for r in rows)
    print(
        f"ghost_eval: {len(rows)} photos, {refused} refused, {flagged} flagged for review, "
        f"median alpha IoU {np.median(ious) if ious else float('nan'):.3f} over {len(ious)}, "
        f"median prepare {np.median([r.seconds for r in rows]):.2f} s; sheets in {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
