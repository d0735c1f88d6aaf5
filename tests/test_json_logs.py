"""HM_LOG_FORMAT=json: the API and a worker, as their own processes, write one JSON object per
line, naming the request, the organization and the job."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import _free_port
from tests.factories import keyed_org, submit
from tests.services import Cluster, Process, hiddenmodel, wait_port

JSON = {"HM_LOG_FORMAT": "json"}


def _lines(process: Process, since: int) -> list[dict[str, Any]]:
    text = process.log_path.read_text(errors="replace")[since:]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _size(process: Process) -> int:
    return len(process.log_path.read_text(errors="replace"))


async def test_api_and_worker_log_json_lines_with_request_organization_and_job(
    client: httpx.AsyncClient, services: Cluster
) -> None:
    org, headers = await keyed_org(client)
    services.stop_workers()
    # A log file of its own, so that every line in it was written in JSON mode.
    name = f"worker-json-{time.time_ns()}"
    worker = hiddenmodel(name, "worker", "--queues", "cpu", "--hostname", f"{name}@%h", env=JSON)
    port = _free_port()
    api = hiddenmodel("api-json", "api", "--host", "127.0.0.1", "--port", str(port), env=JSON)
    api_from = _size(api)
    try:
        deadline = time.monotonic() + 30
        while "ready." not in worker.log():
            assert worker.alive() and time.monotonic() < deadline, worker.log()[-2000:]
            time.sleep(0.1)
        wait_port(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as remote:
            request_id = f"req-{time.time_ns()}"
            r = await submit(remote, {**headers, "X-Request-Id": request_id, "Prefer": "wait=20"})
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
    finally:
        api.stop()
        worker_lines = _lines(worker, 0)
        worker.stop()
    # Every line of both processes parses (json.loads raises otherwise).
    api_lines = _lines(api, api_from)
    submitted = [line for line in api_lines if line.get("request_id") == request_id]
    assert submitted, api_lines
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in submitted)
    started = [
        line
        for line in worker_lines
        if line.get("job_id") == job_id and "started" in line["message"]
    ]
    assert started, worker_lines[-20:]
    assert started[0]["organization_id"] == str(org.id)
    assert {line["level"] for line in worker_lines} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_log_format_is_a_setting(fmt: str) -> None:
    from hiddenmodel.settings import Settings

    assert Settings(log_format=fmt).log_format == fmt
