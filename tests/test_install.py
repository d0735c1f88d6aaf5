"""The API image's install path: ``pip install -e .`` alone, without extras, must run a worker
and the dispatcher against real Redis (kombu's Redis transport imports ``packaging``, which
nothing but the ``ai`` extra used to bring).

Builds a fresh virtual environment without system site-packages: about 30 s with pip's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.factories import keyed_org, submit, wait_job
from tests.services import REPO, Cluster, Process


def _plain_env() -> dict[str, str]:
    """The environment without this checkout's source path or virtual environment."""
    dropped = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    return env


async def test_a_plain_install_runs_a_worker_and_the_dispatcher(
    client: httpx.AsyncClient, services: Cluster, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    env = _plain_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Only the declared dependencies: no model runtime, no test tools.
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, sys; "
            "sys.exit(any(u.find_spec(m) for m in ('torch', 'pytest', 'moto')))",
        ],
        env=env,
    )
    assert probe.returncode == 0

    services.stop_workers()
    if services.dispatcher is not None:
        services.dispatcher.stop()
        services.dispatcher = None
    command = [str(venv / "bin" / "hiddenmodel"), "--log-level", "info"]
    started: list[Process] = []
    try:
        worker = Process(
            "venv-worker",
            [*command, "worker", "--queues", "cpu", "--hostname", "venv-worker@%h"],
            env,
            inherit_env=False,
        )
        started.append(worker)
        started.append(Process("venv-dispatcher", [*command, "dispatcher"], env, inherit_env=False))
        Cluster._wait_ready(worker, timeout=60)
        _, headers = await keyed_org(client)
        r = await submit(client, headers)
        assert r.status_code == 202, r.text
        done: dict[str, Any] = await wait_job(client, headers, r.json()["id"], timeout=60)
        assert done["status"] == "succeeded", done
        assert all(p.alive() for p in started), [p.log()[-2000:] for p in started]
    finally:
        for process in started:
            process.stop()
        services.start_dispatcher()
