"""glibc's malloc thresholds (hiddenmodel.memory): megabyte buffers freed and allocated again
for every job are reused from the heap instead of being mapped, faulted in and unmapped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's malloc only",
)

# A job's pattern: buffers of a few megabytes (inflated rows, a copy, pixels) allocated and
# freed, with small objects that live on allocated between them. Prints whether the tuning
# applied and the page faults of the last 30 rounds.
PROBE = """
import os, resource
from hiddenmodel.memory import tune_malloc
tuned = tune_malloc()
kept = []
def job():
    rows = bytearray(3 * 1024 * 1024)
    rows[::4096] = b"x" * len(rows[::4096])  # touch every page
    kept.append(bytes(200))
    copy = bytes(rows)
    pixels = bytearray(6 * 1024 * 1024)
    pixels[::4096] = b"x" * len(pixels[::4096])
    del rows
    kept.append(bytes(300))
    del copy, pixels
for _ in range(10):
    job()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    job()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("MALLOC_MMAP_THRESHOLD_"), os.environ.get("MALLOC_TRIM_THRESHOLD_"))
"""


def _probe(**env: str) -> tuple[str, int, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
        and k != "HM_MALLOC_TUNING"
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = done.stdout.splitlines()
    tuned, faults = first.split()
    return tuned, int(faults), second


def test_tuned_processes_reuse_large_buffers_instead_of_faulting_them_in() -> None:
    tuned, faults, exported = _probe()
    assert tuned == "True"
    # 30 rounds touching 3,072 pages each: tuned, they are the heap's pages of the first
    # rounds; untuned, glibc maps most of them afresh every round.
    assert faults < 1000, faults
    # Processes started from this one get the same limits from glibc itself.
    assert exported == "67108864 134217728"

    untuned, untuned_faults, _ = _probe(HM_MALLOC_TUNING="0")
    assert untuned == "False"
    assert untuned_faults > 30 * 1000, untuned_faults


def test_an_operators_own_malloc_settings_are_kept() -> None:
    tuned, _, exported = _probe(MALLOC_TRIM_THRESHOLD_="1048576")
    assert tuned == "False"
    assert exported == "None 1048576"
    tuned, _, _ = _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert tuned == "False"


@pytest.mark.parametrize(
    ("argv", "runs"),
    [
        (["api"], "uvicorn.run"),
        (["worker", "--queues", "cpu"], "workers.celery_app.app.worker_main"),
        (["dispatcher"], "workers.dispatcher.run_forever"),
    ],
)
def test_the_long_running_commands_tune_malloc_before_they_start(
    argv: list[str], runs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hiddenmodel import cli

    order: list[str] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: order.append("tuned") or True)
    monkeypatch.setattr(runs, lambda *args, **kwargs: order.append("started"))
    assert cli.main(argv) in (0, None)
    assert order == ["tuned", "started"]
