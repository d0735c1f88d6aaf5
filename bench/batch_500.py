"""A 500-photo batch through the real stack: how long the submit takes, and what the API
process holds while it streams the archive of outputs.

Starts its own services on loopback (see ``_harness``): a database
``hiddenmodel_bench_batches`` built by the real migrations, Redis database 9 (flushed), moto's
S3 server, the API under uvicorn with one worker, one dispatcher and one Celery worker on the
``cpu`` queue; the organization's limits are at their ceiling (the quota checks run, refuse
nothing). Then:

1. builds a ZIP of ``--items`` photographic PNGs (``--size``, default 320x240) with a
   manifest, creates a ``resize`` batch and uploads the ZIP (timed: intake);
2. ``POST /v1/batches/{id}/submit``: every item admitted as a job in one transaction (timed:
   the main number), after a dry run of the same (timed too);
3. waits for the batch to complete;
4. downloads ``GET /v1/batches/{id}/archive`` while sampling the resident memory (RSS) of the
   API's process group every 20 ms; reports the archive's size, the RSS before the download
   and its peak during it. An archive held in memory would add at least its own size.

Prints one summary line; ``--out`` writes everything as JSON.

    .venv/bin/python bench/batch_500.py --out var/bench/batch_500.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import _harness as h
import httpx


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the group (the API and any child it spawned)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: the process group
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


class RssSampler(threading.Thread):
    def __init__(self, pgid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pgid, self.every = pgid, every
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, group_rss_bytes(self.pgid))
            self.samples += 1
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def build_zip(items: int, width: int, height: int) -> tuple[bytes, int]:
    """``items`` distinct photos (a few seeds, re-encoded with a varying text chunk so no
    two are byte-identical) and a manifest; returns the archive and its photos' bytes."""
    from PIL import Image, PngImagePlugin

    bases = [h.photo_png(width, height, seed) for seed in range(8)]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in bases]
    buf = io.BytesIO()
    sheet = io.StringIO()
    writer = csv.writer(sheet)
    writer.writerow(["image", "params"])
    photo_bytes = 0
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(items):
            info = PngImagePlugin.PngInfo()
            info.add_text("sku", f"sku-{i:05d}")
            out = io.BytesIO()
            decoded[i % len(decoded)].save(out, "PNG", pnginfo=info, compress_level=1)
            name = f"shoot/sku{i:05d}_{'front' if i % 2 else 'back'}.png"
            archive.writestr(name, out.getvalue())
            photo_bytes += out.tell()
            writer.writerow([name, json.dumps({"width": width // 2}) if i % 5 == 0 else ""])
        archive.writestr("manifest.csv", sheet.getvalue())
    return buf.getvalue(), photo_bytes


def wait_completed(client: httpx.Client, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/v1/batches/{batch_id}").json()
        if body["status"] in ("completed", "canceled"):
            return body
        time.sleep(0.5)
    raise TimeoutError(f"batch did not complete: {body}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--size", default="320x240", help="photo size, WxH")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    env = h.configure_env(
        database="hiddenmodel_bench_batches", redis_url="redis://127.0.0.1:6379/9"
    )
    h.install_cleanup()
    stack = h.start_stack(env, workers=args.workers)
    assert stack.tenant is not None and stack.api is not None
    result: dict[str, Any] = {"items": args.items, "photo_size": args.size}

    t0 = time.perf_counter()
    data, photo_bytes = build_zip(args.items, width, height)
    result["zip_bytes"], result["photo_bytes"] = len(data), photo_bytes
    print(f"zip of {args.items} photos: {len(data) / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s)")

    with httpx.Client(base_url=stack.api_url, headers=stack.tenant.headers, timeout=600) as client:
        r = client.post(
            "/v1/batches",
            json={"operation": "resize", "params": {"width": width}, "name": "bench"},
        )
        r.raise_for_status()
        batch_id = r.json()["id"]
        t0 = time.perf_counter()
        r = client.post(
            f"/v1/batches/{batch_id}/items",
            files={"archive": ("shoot.zip", data, "application/zip")},
        )
        r.raise_for_status()
        result["intake_s"] = round(time.perf_counter() - t0, 3)
        assert r.json()["added"] == args.items, r.text

        t0 = time.perf_counter()
        r = client.post(f"/v1/batches/{batch_id}/submit?dry_run=true")
        r.raise_for_status()
        result["dry_run_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        r = client.post(f"/v1/batches/{batch_id}/submit")
        r.raise_for_status()
        result["submit_s"] = round(time.perf_counter() - t0, 3)
        print(f"intake {result['intake_s']}s, dry run {result['dry_run_s']}s, "
              f"submit {result['submit_s']}s")  # fmt: skip

        t0 = time.perf_counter()
        done = wait_completed(client, batch_id, timeout=1800)
        result["run_s"] = round(time.perf_counter() - t0, 1)
        result["succeeded"] = done["counts"]["succeeded"]
        print(f"{done['counts']['succeeded']} items succeeded in {result['run_s']}s")

        pgid = stack.api.pid
        time.sleep(1.0)
        result["api_rss_before_mb"] = round(group_rss_bytes(pgid) / 2**20, 1)
        sampler = RssSampler(pgid)
        sampler.start()
        t0 = time.perf_counter()
        size = 0
        with client.stream("GET", f"/v1/batches/{batch_id}/archive") as response:
            response.raise_for_status()
            sink = io.BytesIO()
            for chunk in response.iter_bytes():
                size += len(chunk)
                sink.write(chunk)
        sampler.stop()
        result["archive_s"] = round(time.perf_counter() - t0, 2)
        result["archive_bytes"] = size
        result["api_rss_peak_mb"] = round(sampler.peak / 2**20, 1)
        result["rss_samples"] = sampler.samples
        archive = zipfile.ZipFile(sink)
        result["archive_members"] = len(archive.namelist())
        assert result["archive_members"] == args.items + 1, result

    stack.stop_workers_and_dispatcher()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(
        f"SUMMARY batch_500: {args.items} items, submit {result['submit_s']}s "
        f"(dry run {result['dry_run_s']}s, intake {result['intake_s']}s), "
        f"archive {result['archive_bytes'] / 1e6:.1f} MB in {result['archive_s']}s, "
        f"API RSS {result['api_rss_before_mb']} MB before, peak {result['api_rss_peak_mb']} MB "
        f"while streaming"
    )


if __name__ == "__main__":
    main()
