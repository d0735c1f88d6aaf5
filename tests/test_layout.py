"""The repository layout must not shadow the standard library's ``platform`` module.

``platform/`` is a source root without ``__init__.py``. Were it a package, every process with
the repository root on ``sys.path`` (a ``python -c`` from the checkout, pytest) would import it
in place of the standard module that uuid, pydantic, SQLAlchemy and torch rely on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()

# Run from the repository root with `python -c`, so the root is first on sys.path: the case in
# which a `platform` package there would win.
PROBE = """
import json, os, sys
import {module}
import platform
import re
print(json.dumps({{
    "platform_file": platform.__file__,
    "system": platform.system(),
    "root_on_path": os.getcwd() in [os.path.abspath(p) for p in sys.path],
    "module_file": sys.modules["{module}"].__file__,
}}))
"""


def _probe(module: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONSAFEPATH", "PYTHONPATH"}}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probe: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


def _is_stdlib(path: object) -> bool:
    return isinstance(path, str) and Path(path).resolve().is_relative_to(STDLIB)


def test_platform_is_not_a_package() -> None:
    assert (ROOT / "platform").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_tests_import_the_standard_platform() -> None:
    assert _is_stdlib(platform.__file__), platform.__file__
    assert sys.modules["platform"] is platform
    assert platform.system()


@pytest.mark.parametrize(
    ("module", "source"),
    [("hiddenmodel.api.app", "platform/hiddenmodel"), ("workers", "workers")],
)
def test_project_processes_import_the_standard_platform(module: str, source: str) -> None:
    probe = _probe(module)
    assert probe["root_on_path"], probe
    assert _is_stdlib(probe["platform_file"]), probe
    assert probe["system"] == platform.system(), probe
    module_file = Path(str(probe["module_file"])).resolve()
    assert module_file.is_relative_to(ROOT / source), probe


# What a worker does at start before it consumes: import the modules the app includes.
REGISTERED = """
import json
from workers.celery_app import app
app.loader.import_default_modules()
print(json.dumps(sorted(name for name in app.tasks if not name.startswith("celery."))))
"""
# Queued messages and the dispatcher name tasks by these: a module move must keep them.
TASK_NAMES = {
    "jobs.run",
    "webhooks.deliver",
    "usage.push_to_stripe",
    "billing.reconcile",
    "mail.deliver_outbox",
    "maintenance.sweep_orphans",
    "maintenance.expire_outputs",
}


def test_a_worker_registers_every_task_under_its_name() -> None:
    """The worker's ``[tasks]``: every task of ``workers/tasks/`` under the name its messages
    carry, which covers every name the code sends."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-c", REGISTERED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    registered = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert registered == TASK_NAMES
    sources = [*(ROOT / "workers").rglob("*.py"), *(ROOT / "platform").rglob("*.py")]
    sent = {
        name
        for path in sources
        for name in re.findall(r"send_task\(\s*\"([\w.]+)\"", path.read_text())
    }
    from hiddenmodel.webhooks import enqueue

    assert sent | {enqueue.TASK_NAME} <= registered
    assert len(sent) >= 6, sent
