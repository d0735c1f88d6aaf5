"""bench/autoscale_sim.py, the model behind the GPU autoscaling thresholds (docs/DEPLOY.md),
behaves as KEDA and the dispatcher do on the cases whose answer is known."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SIM_PATH = Path(__file__).resolve().parents[1] / "bench" / "autoscale_sim.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("autoscale_sim", SIM_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoscale_sim"] = module
    spec.loader.exec_module(module)
    return module


def _one_shoot(sim: ModuleType) -> list[tuple[float, int]]:
    jobs: list[tuple[float, int]] = sim.arrivals(seed=1, daily_jobs=0, shoots=1)
    return jobs


def test_every_job_of_a_shoot_runs_and_the_workers_go_back_to_zero(sim: ModuleType) -> None:
    jobs = _one_shoot(sim)
    assert len(jobs) == sim.SHOOT_PHOTOS
    config = sim.Config("t", target=8, polling=15, cooldown=300)
    result = sim.simulate(config, jobs, start_s=150.0)
    assert result["jobs"] == sim.SHOOT_PHOTOS
    # Nothing runs before the first pod is ready: the first jobs wait a cold start.
    assert result["p95_wait_s"] >= 150
    # Paid for more than the GPU work (start and cooldown), but not for the rest of the day.
    busy_hours = result["useful_gpu_hours"]
    assert busy_hours < result["gpu_hours"] < busy_hours + 8 * (150 + 300 + 600) / 3600


def test_the_organization_cap_bounds_the_gpus_a_shoot_gets(sim: ModuleType) -> None:
    jobs = _one_shoot(sim)
    for cap in (16, 64):
        config = sim.Config("t", target=8, polling=15, cooldown=300, org_cap=cap)
        assert sim.simulate(config, jobs, start_s=150.0)["peak_pods"] == math.ceil(cap / 8)


def test_a_longer_cooldown_keeps_idle_gpus_longer(sim: ModuleType) -> None:
    jobs = sim.arrivals(seed=3, daily_jobs=500, shoots=2)
    short, long = (
        sim.simulate(sim.Config("t", target=8, polling=15, cooldown=c), jobs, start_s=150.0)
        for c in (120, 1800)
    )
    assert long["gpu_hours"] > short["gpu_hours"]
    assert long["jobs"] == short["jobs"] == len(jobs)


def test_a_batch_of_four_takes_the_measured_gpu_time(sim: ModuleType) -> None:
    assert sim.batch_seconds(1) == pytest.approx(1.92)
    assert sim.batch_seconds(4) / 4 == pytest.approx(1.15, abs=0.01)
