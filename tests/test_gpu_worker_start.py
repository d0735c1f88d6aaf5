"""A GPU worker loads its model as each process starts, whatever the pool, and reports
``ready.`` only then: nothing is received before a process can run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.services import LOG_DIR, Cluster, hiddenmodel


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.models.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"
    make_tiny_model(path)
    return path


def test_a_prefork_gpu_worker_reports_ready_once_every_pool_process_loaded(
    s3: None, tiny_model: Path
) -> None:
    (LOG_DIR / "worker-gpu-prefork.log").unlink(missing_ok=True)
    worker = hiddenmodel(
        "worker-gpu-prefork",
        "worker",
        "--queues",
        "gpu",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--hostname",
        "test-gpu-prefork@%h",
        env={"HM_MODEL_DIR": str(tiny_model)},
    )
    try:
        Cluster._wait_ready(worker, timeout=180)
        log = worker.log()
        ready = log.index("ready.")
        loads = list(re.finditer(r"models loaded in process (\d+)", log))
        # Both pool processes, each its own (the model cannot cross a fork), before ready.
        assert len(loads) == 2, log[-3000:]
        assert all(m.start() < ready for m in loads), log[-3000:]
        pids = {int(m.group(1)) for m in loads}
        assert len(pids) == 2 and worker.pid not in pids
    finally:
        worker.stop()
