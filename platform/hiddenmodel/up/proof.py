"""What ``up`` proves before it says the platform is up: ``/readyz`` answers, the demo key
reaches ``/v1/me``, a real ``resize`` job and a small ``ghost_mannequin`` job run through the
API, the dispatcher, the workers and S3, and their outputs download.

Each proof fails ``up`` with the reason and where to look (the worker's log), rather than
printing a banner for a platform that does not work.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx

from hiddenmodel.processes import Children
from hiddenmodel.up.demo import (
    DEMO_IMAGE_SIZE,
    GHOST_INTERIOR_FILE,
    GHOST_PHOTO_SIZE,
    demo_garment_photo,
    demo_image,
)
from hiddenmodel.up.model import ModelPlan
from hiddenmodel.up.supervisor import START_TIMEOUT_S, UpError

DEMO_JOB_WAIT_S = 30
DEMO_JOB_PARAMS = {"width": 128, "height": 96, "mode": "fit"}
GHOST_JOB_WAIT_S = 60
# The photo's own long side: nothing is resampled, so the report judges the pipeline, not a
# thumbnail whose few pixels of mannequin stand count for more than they are.
# Few steps: seconds on a CPU with the tiny model, still the whole pipeline.
GHOST_JOB_PARAMS = {"size": max(GHOST_PHOTO_SIZE), "steps": 4, "seed": 7}
# What a randomly initialised model cannot help: it paints noise, so the seam between what it
# paints and the garment shows. Any other reason is a fault of the pipeline and fails ``up``.
RANDOM_MODEL_REASONS = ("visible seam",)


def prove_ready(
    client: httpx.Client, key: str, children: Children
) -> tuple[httpx.Response, httpx.Response]:
    """Poll /readyz until the API is ready, then call /v1/me with the demo key."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        children.ensure_running()
        try:
            ready = client.get("/readyz")
            if ready.status_code == 200:
                break
            problem = f"/readyz answers {ready.status_code}: {ready.text}"
        except httpx.HTTPError as exc:
            problem = f"the API does not answer ({type(exc).__name__})"
        if time.monotonic() > deadline:
            raise UpError(problem)
        time.sleep(0.2)
    me = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    if me.status_code != 200:
        raise UpError(f"GET /v1/me with the demo key answers {me.status_code}: {me.text}")
    return ready, me


def _job_logs(children: Children, worker: str = "worker") -> str:
    """Where to look when a job does not finish: the worker's last lines, the dispatcher's log."""
    by_name = {c.name: c for c in children.started}
    text = by_name[worker].log_tail() if worker in by_name else ""
    dispatcher = by_name.get("dispatcher")
    if dispatcher is not None and dispatcher.log_path is not None:
        text += f"\n(the dispatcher logs to {dispatcher.log_path})"
    return text


def _download(
    client: httpx.Client, output: dict[str, Any], what: str
) -> tuple[bytes, tuple[int, int], str | None]:
    """An output fetched from its presigned URL: its bytes, its size and its image format."""
    download = client.get(output["url"])
    if download.status_code != 200:
        raise UpError(f"downloading {what} answers {download.status_code}: {download.text[:500]}")
    from PIL import Image

    with Image.open(io.BytesIO(download.content)) as image:
        return download.content, image.size, image.format


def prove_jobs(client: httpx.Client, key: str, children: Children) -> list[str]:
    """Submit a ``resize`` job with the demo key, wait for it, download its output.

    This passes through every part of the platform: the API validates the upload and stores
    it in S3, the dispatcher sends the job through Redis, the worker runs it and writes the
    output to S3, and the presigned URL serves it.
    """
    response = client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {key}", "Prefer": f"wait={DEMO_JOB_WAIT_S}"},
        data={"operation": "resize", "params": json.dumps(DEMO_JOB_PARAMS)},
        files={"image": ("demo.png", demo_image(), "image/png")},
        timeout=DEMO_JOB_WAIT_S + 10,
    )
    if response.status_code not in (200, 202):
        raise UpError(
            f"POST /v1/jobs with the demo key answers {response.status_code}: {response.text}"
        )
    job: dict[str, Any] = response.json()
    if job["status"] != "succeeded":
        children.ensure_running()
        detail = f" ({job['error']['message']})" if job.get("error") else ""
        raise UpError(
            f"the demo job {job['id']} is {job['status']}{detail} after waiting "
            f"{DEMO_JOB_WAIT_S} s{_job_logs(children)}"
        )
    output = job["outputs"][0]
    content, size, kind = _download(client, output, "the demo job's output")
    if size != (output["width"], output["height"]):
        raise UpError(f"the demo job's output is {size}, not {output['width']}x{output['height']}")
    width, height = DEMO_IMAGE_SIZE
    run_s = job["timings"]["run_seconds"]
    return [
        f"  POST /v1/jobs (resize, {width}x{height} PNG, params {json.dumps(DEMO_JOB_PARAMS)}, "
        f"Prefer: wait={DEMO_JOB_WAIT_S}): {response.status_code}, job {job['id']} "
        f"{job['status']}" + (f", ran {run_s:.2f} s" if run_s is not None else ""),
        f"  Output URL (presigned, expires {output['url_expires_at']}):",
        f"    {output['url']}",
        f"  Downloaded it: {kind} {size[0]}x{size[1]}, {len(content)} bytes",
    ]


def review_failures(report: dict[str, Any], model: ModelPlan) -> list[str]:
    """The quality report's reasons that ``up`` must not call a success: all of them with a
    real model; with random weights, all but what their noise makes inevitable."""
    reasons = [str(r) for r in report.get("reasons", [])]
    if model.random_weights:
        return [r for r in reasons if not r.startswith(RANDOM_MODEL_REASONS)]
    return reasons


def prove_ghost(
    client: httpx.Client, key: str, children: Children, photo_path: Path, model: ModelPlan
) -> list[str]:
    """Submit a ``ghost_mannequin`` job at the photo's own size, wait for it and download its
    output; fail when its quality report flags what the demo claims to show.

    It runs on the GPU worker with the resident model: segmentation, the hidden regions,
    inpainting, compositing and the quality report. Not finishing within the wait is reported,
    not fatal: a real checkpoint on a CPU is slow without being broken.
    """
    photo = demo_garment_photo()
    photo_path.write_bytes(photo)
    photo_path.with_name(GHOST_INTERIOR_FILE).write_bytes(demo_garment_photo(interior=True))
    response = client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {key}", "Prefer": f"wait={GHOST_JOB_WAIT_S}"},
        data={"operation": "ghost_mannequin", "params": json.dumps(GHOST_JOB_PARAMS)},
        files={"image": (photo_path.name, photo, "image/png")},
        timeout=GHOST_JOB_WAIT_S + 10,
    )
    if response.status_code not in (200, 202):
        raise UpError(
            f"POST /v1/jobs (ghost_mannequin) answers {response.status_code}: {response.text}"
        )
    job: dict[str, Any] = response.json()
    width, height = GHOST_PHOTO_SIZE
    params = json.dumps(GHOST_JOB_PARAMS, separators=(",", ":"))
    head = (
        f"  POST /v1/jobs (ghost_mannequin, {width}x{height} PNG of a T-shirt on a mannequin, "
        f"params {params}, Prefer: wait={GHOST_JOB_WAIT_S}): {response.status_code}, "
        f"job {job['id']} {job['status']}"
    )
    if job["status"] in ("queued", "running"):
        children.ensure_running()
        return [
            head,
            f"    not finished after {GHOST_JOB_WAIT_S} s (a large model on a CPU is slow): "
            f"GET /v1/jobs/{job['id']} follows it",
        ]
    if job["status"] != "succeeded":
        children.ensure_running()
        detail = f" ({job['error']['message']})" if job.get("error") else ""
        raise UpError(
            f"the ghost_mannequin demo job {job['id']} is {job['status']}{detail}"
            f"{_job_logs(children, 'worker-gpu')}"
        )
    report: dict[str, Any] = job.get("report") or {}
    failures = review_failures(report, model)
    if failures:
        raise UpError(
            f"the ghost_mannequin demo job {job['id']} succeeded, but its own quality report "
            f"flags it: {'; '.join(failures)} (GET /v1/jobs/{job['id']} shows the report)"
        )
    output = next(o for o in job["outputs"] if o["name"] == "output")
    content, size, kind = _download(client, output, "the ghost_mannequin job's output")
    run_s = job["timings"]["run_seconds"]
    # One JSON line with what a caller reads off the job: easy to check by eye or by script.
    result = {
        "status": job["status"],
        "gpu_seconds": job["gpu_seconds"],
        "needs_review": report.get("needs_review"),
        "reasons": report.get("reasons", []),
        "outputs": [o["name"] for o in job["outputs"]],
    }
    return [
        head + (f", ran {run_s:.2f} s" if run_s is not None else ""),
        f"  ghost_mannequin result: {json.dumps(result, ensure_ascii=False)}",
        f"  Output URL (presigned, expires {output['url_expires_at']}):",
        f"    {output['url']}",
        f"  Downloaded it: {kind} {size[0]}x{size[1]}, {len(content)} bytes; "
        f"the photo it was made from is {photo_path}, its interior frame "
        f"{photo_path.with_name(GHOST_INTERIOR_FILE)}",
    ]
