"""ghost_mannequin through the whole platform: API, fair dispatch, a GPU worker process with
the tiny model resident, dynamic batching, progress, cancel and metered GPU-seconds."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import db_rows, db_scalar
from tests.factories import keyed_org, submit, wait_job
from tests.garments import make_hard_scene, make_scene
from tests.services import Cluster, Process

pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.models.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"
    make_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def gpu_worker(cluster: Cluster, tiny_model: Path) -> Iterator[Process]:
    """One GPU worker: threads so concurrent jobs can meet in the batcher; a wide window so
    they do on a busy two-core machine."""
    worker = cluster.start_worker(
        "gpu",
        "--pool",
        "threads",
        "--concurrency",
        "4",
        env={"HM_MODEL_DIR": str(tiny_model), "HM_GPU_BATCH_WINDOW_MS": "3000"},
    )
    yield worker
    cluster.workers.remove(worker)
    worker.stop()


def photo() -> bytes:
    buf = io.BytesIO()
    make_scene("top", seed=3).pil().save(buf, "PNG")
    return buf.getvalue()


def ghost(params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"size": 256, "steps": 4, "seed": 11, **(params or {})}


async def test_operation_is_registered_with_schema_and_cost(client: httpx.AsyncClient) -> None:
    ops = {o["name"]: o for o in (await client.get("/v1/operations")).json()}
    ghost_op = ops["ghost_mannequin"]
    assert ghost_op["queue"] == "gpu"
    assert set(ghost_op["inputs"]) == {"image", "mask", "body_mask", "interior"}
    assert ghost_op["params_schema"]["properties"]["steps"]["maximum"] == 100
    assert ghost_op["cost_estimate_1024px"]["gpu_seconds"] > 1.0


async def test_a_batch_of_ghost_jobs(client: httpx.AsyncClient, gpu_worker: Process) -> None:
    _, headers = await keyed_org(client)
    image = photo()
    responses = await asyncio.gather(
        *[
            submit(
                client,
                headers,
                operation="ghost_mannequin",
                image=image,
                params=ghost({"debug_layers": i == 0}),
            )
            for i in range(3)
        ]
    )
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    done = [await wait_job(client, headers, r.json()["id"], timeout=120) for r in responses]
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    for job in done:
        names = {o["name"] for o in job["outputs"]}
        assert {"output", "alpha"} <= names
        out = next(o for o in job["outputs"] if o["name"] == "output")
        assert max(out["width"], out["height"]) == 256
        assert job["gpu_seconds"] > 0
        assert isinstance(job["report"]["needs_review"], bool) and job["report"]["seed"] == 11
        usage = db_rows(
            "SELECT gpu_seconds, outcome FROM usage_events WHERE job_id = :j", j=job["id"]
        )
        assert usage == [(pytest.approx(job["gpu_seconds"], abs=1e-3), "succeeded")]
    assert any(name.startswith("debug-") for name in {o["name"] for o in done[0]["outputs"]})
    # The three identical jobs met in the batcher and shared pipeline calls.
    assert max(max(d["report"]["batch_sizes"]) for d in done) >= 2, [
        d["report"]["batch_sizes"] for d in done
    ]
    image_out = Image.open(io.BytesIO(httpx.get(done[0]["outputs"][0]["url"]).content))
    assert image_out.mode == "RGB"


async def test_progress_and_cancel_mid_diffusion(
    client: httpx.AsyncClient, gpu_worker: Process
) -> None:
    _, headers = await keyed_org(client)
    r = await submit(
        client,
        headers,
        operation="ghost_mannequin",
        image=photo(),
        params=ghost({"size": 1024, "steps": 100}),
    )
    job_id = r.json()["id"]
    # Poll the job resource: progress reaches it every few hundred milliseconds.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if body["stage"] == "inpainting" and body["progress"] > 0.15:
            break
        await asyncio.sleep(0.1)
    assert body["stage"] == "inpainting", body
    r = await client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 202 and r.json()["status"] == "running"
    done = await wait_job(client, headers, job_id, timeout=60)
    assert done["status"] == "canceled" and done["error"]["code"] == "canceled"
    # The event stream of the finished job tells the same story, step by step.
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
        text = "".join([chunk async for chunk in stream.aiter_text()])
    assert '"status": "canceled"' in text
    # Stopped at a step, long before 100 of them; the GPU time used is billed.
    assert done["progress"] < 0.9
    gpu, outcome = db_rows(
        "SELECT gpu_seconds, outcome FROM usage_events WHERE job_id = :j", j=job_id
    )[0]
    assert outcome == "canceled" and gpu > 0
    assert (
        db_scalar("SELECT status FROM quota_reservations WHERE job_id = :j", j=job_id) == "settled"
    )


def test_a_gpu_worker_without_its_model_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "hiddenmodel.cli", "worker", "--queues", "gpu"],
        env={**os.environ, "HM_MODEL_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "missing subfolder unet/" in result.stderr
    assert "Traceback" not in result.stderr


async def test_caller_masks_are_taken_and_checked(
    client: httpx.AsyncClient, gpu_worker: Process
) -> None:
    _, headers = await keyed_org(client)
    scene = make_scene("top", seed=3)

    def png_of(mask: Any) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((mask * 255).astype("uint8"), "L").save(buf, "PNG")
        return buf.getvalue()

    files = {
        "image": ("photo.png", photo(), "image/png"),
        "mask": ("garment.png", png_of(scene.garment), "image/png"),
        "body_mask": ("body.png", png_of(scene.body), "image/png"),
    }
    r = await submit(client, headers, operation="ghost_mannequin", files=files, params=ghost())
    assert r.status_code == 202, r.text
    assert set(r.json()["inputs"]) == {"image", "mask", "body_mask"}
    done = await wait_job(client, headers, r.json()["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["report"]["segmentation"] == "supplied", done["report"]
    small = io.BytesIO()
    Image.new("L", (10, 10)).save(small, "PNG")
    files["body_mask"] = ("body.png", small.getvalue(), "image/png")
    r = await submit(client, headers, operation="ghost_mannequin", files=files, params=ghost())
    assert r.status_code == 422 and r.json()["input"] == "body_mask"


async def test_a_photo_without_a_garment_fails_clearly_and_is_not_billed(
    client: httpx.AsyncClient, gpu_worker: Process
) -> None:
    _, headers = await keyed_org(client)
    gradient = Image.linear_gradient("L").resize((256, 320)).convert("RGB")
    buf = io.BytesIO()
    gradient.save(buf, "PNG")
    r = await submit(
        client, headers, operation="ghost_mannequin", image=buf.getvalue(), params=ghost()
    )
    done = await wait_job(client, headers, r.json()["id"], timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "no-garment-found", done
    assert done["error"]["status"] == 422
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=done["id"]) == 0


async def test_a_shop_scene_is_refused_clearly_and_is_not_billed(
    client: httpx.AsyncClient, gpu_worker: Process
) -> None:
    _, headers = await keyed_org(client)
    buf = io.BytesIO()
    Image.fromarray(make_hard_scene("busy-scene", seed=0).image).save(buf, "PNG")
    r = await submit(
        client, headers, operation="ghost_mannequin", image=buf.getvalue(), params=ghost()
    )
    done = await wait_job(client, headers, r.json()["id"], timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "no-backdrop-found" and done["error"]["status"] == 422
    assert "not a ghost-mannequin studio photo" in done["error"]["message"]
    assert done["outputs"] == [] and done["gpu_seconds"] in (None, 0, 0.0)
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=done["id"]) == 0
