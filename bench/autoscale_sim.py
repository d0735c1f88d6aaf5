"""Queue-driven autoscaling of the GPU workers, simulated: KEDA's rule against measured job
times, under a diurnal load with bursts of 2,000-photo shoots.

The model, one second per step over a day:

* Arrivals: a diurnal Poisson stream of single jobs (peak at 14:00 UTC, ``--daily-jobs`` in
  all) plus ``--shoots`` uploads of 2,000 photos each, every photo submitted within
  ``--upload-s`` (120 s: a batch upload) of the shoot's start, at seeded random times
  between 08:00 and 20:00.
* Dispatch: a job leaves the outbox for the Celery queue only while its organization has
  fewer than the configuration's ``org_cap`` jobs dispatched or running
  (HM_DISPATCH_ORG_INFLIGHT_CAP, or the plan's max_running_jobs); each shoot is its own
  organization, single jobs share one.
* Workers: a pod is ready ``--start-s`` after KEDA asks for it (node, image, model load);
  it runs batches of up to 4 jobs, a batch of n taking 1.92 + 0.893 * (n - 1) GPU-seconds (the
  H200 figures: 1.92 s at batch 1, 1.15 s per image at batch 4, DESIGN §6).
* KEDA: every ``polling`` seconds, desired = ceil(metric / target) clamped to
  [min, max], where metric = queued + running (the redis and prometheus triggers together).
  Up at once; down only to the highest desired count of the last ``cooldown`` seconds (the
  HPA stabilization window and KEDA's cooldown before zero), idle pods first.

It prints one line per configuration (p50/p95 queue wait, from submit to start; GPU-hours
paid for, starting pods included) and a summary line for the chosen one.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field

DAY_S = 86_400
SHOOT_PHOTOS = 2_000
SHOOT_UPLOAD_S = 120.0
BATCH = 4


def batch_seconds(n: int) -> float:
    return 1.92 + 0.893 * (n - 1)


@dataclass(frozen=True)
class Config:
    name: str
    target: int
    polling: int
    cooldown: int
    min_replicas: int = 0
    max_replicas: int = 16
    org_cap: int = 64


@dataclass
class Pod:
    ready_at: float
    busy_until: float = 0.0
    running: list[tuple[float, int]] = field(default_factory=list)


def arrivals(
    seed: int, daily_jobs: int, shoots: int, upload_s: float = SHOOT_UPLOAD_S
) -> list[tuple[float, int]]:
    """(time, organization) for every job of the day; organization 0 is the trickle."""
    rng = random.Random(seed)
    jobs: list[tuple[float, int]] = []
    for second in range(DAY_S):
        hour = second / 3600
        rate = daily_jobs / DAY_S * (1 + math.cos((hour - 14) / 24 * 2 * math.pi))
        if rng.random() < rate:
            jobs.append((second + rng.random(), 0))
    for shoot in range(1, shoots + 1):
        start = rng.uniform(8 * 3600, 20 * 3600)
        jobs += [(start + rng.uniform(0, upload_s), shoot) for _ in range(SHOOT_PHOTOS)]
    return sorted(jobs)


def simulate(config: Config, jobs: list[tuple[float, int]], start_s: float) -> dict[str, float]:
    outbox: dict[int, deque[tuple[float, int]]] = {}
    inflight: dict[int, int] = {}
    queue: deque[tuple[float, int]] = deque()
    pods: list[Pod] = []
    waits: list[float] = []
    shoot_waits: list[float] = []
    desired_history: deque[tuple[int, int]] = deque()
    pod_seconds = 0.0
    peak = 0
    next_job = 0
    horizon = DAY_S + 6 * 3600
    for now in range(horizon):
        while next_job < len(jobs) and jobs[next_job][0] <= now:
            t, org = jobs[next_job]
            outbox.setdefault(org, deque()).append((t, org))
            next_job += 1
        for org, waiting in outbox.items():
            while waiting and inflight.get(org, 0) < config.org_cap:
                queue.append(waiting.popleft())
                inflight[org] = inflight.get(org, 0) + 1
        for pod in pods:
            if pod.running and pod.busy_until <= now:
                for _, owner in pod.running:
                    inflight[owner] -= 1
                pod.running = []
            if not pod.running and pod.ready_at <= now and queue:
                take = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
                waits += [now - t for t, _ in take]
                shoot_waits += [now - t for t, org in take if org]
                pod.running = take
                pod.busy_until = now + batch_seconds(len(take))
        if now % config.polling == 0:
            metric = len(queue) + sum(len(p.running) for p in pods)
            want = math.ceil(metric / config.target) if metric else 0
            want = max(config.min_replicas, min(config.max_replicas, want))
            desired_history.append((now, want))
            while desired_history and desired_history[0][0] < now - config.cooldown:
                desired_history.popleft()
            keep = max(d for _, d in desired_history)
            if want > len(pods):
                pods += [Pod(ready_at=now + start_s) for _ in range(want - len(pods))]
            elif keep < len(pods):
                idle = [p for p in pods if not p.running]
                for pod in idle[: len(pods) - keep]:
                    pods.remove(pod)
        pod_seconds += len(pods)
        peak = max(peak, len(pods))
        if (
            next_job == len(jobs)
            and not queue
            and not any(outbox.values())
            and not any(p.running for p in pods)
            and len(pods) <= config.min_replicas
        ):
            pod_seconds += (horizon - now - 1) * len(pods)
            break
    waits.sort()
    shoot_waits.sort()
    return {
        "p50_wait_s": waits[len(waits) // 2],
        "p95_wait_s": waits[int(len(waits) * 0.95)],
        "shoot_p50_wait_s": shoot_waits[len(shoot_waits) // 2] if shoot_waits else 0.0,
        "shoot_p95_wait_s": shoot_waits[int(len(shoot_waits) * 0.95)] if shoot_waits else 0.0,
        "peak_pods": peak,
        "gpu_hours": pod_seconds / 3600,
        "jobs": len(waits),
        "useful_gpu_hours": len(waits) * 1.15 / 3600,
    }


CONFIGS = (
    Config("chosen", target=8, polling=15, cooldown=300),
    Config("target4", target=4, polling=15, cooldown=300),
    Config("target16", target=16, polling=15, cooldown=300),
    Config("cooldown120", target=8, polling=15, cooldown=120),
    Config("cooldown900", target=8, polling=15, cooldown=900),
    Config("cooldown1800", target=8, polling=15, cooldown=1800),
    Config("poll60", target=8, polling=60, cooldown=300),
    Config("warm1", target=8, polling=15, cooldown=300, min_replicas=1),
    Config("max8", target=8, polling=15, cooldown=300, max_replicas=8),
    Config("orgcap4", target=8, polling=15, cooldown=300, org_cap=4),
    Config("orgcap128", target=8, polling=15, cooldown=300, org_cap=128),
    Config("start60", target=8, polling=15, cooldown=300),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--daily-jobs", type=int, default=3000)
    parser.add_argument("--shoots", type=int, default=3)
    parser.add_argument("--upload-s", type=float, default=SHOOT_UPLOAD_S)
    parser.add_argument("--start-s", type=float, default=150.0, help="pod start + model load")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    jobs = arrivals(args.seed, args.daily_jobs, args.shoots, args.upload_s)
    results = {}
    for config in CONFIGS:
        # start60: the same rule with weights on a node-local disk (60 s to ready).
        r = simulate(config, jobs, 60.0 if config.name == "start60" else args.start_s)
        results[config.name] = {**r, **config.__dict__}
        print(
            f"{config.name:13s} target={config.target:<3d} poll={config.polling:<3d}s "
            f"cooldown={config.cooldown:<5d}s min={config.min_replicas} cap={config.org_cap:<3d} "
            f"p50={r['p50_wait_s']:.0f}s p95={r['p95_wait_s']:.0f}s "
            f"shoot_p50={r['shoot_p50_wait_s']:.0f}s shoot_p95={r['shoot_p95_wait_s']:.0f}s "
            f"peak={r['peak_pods']} gpu_hours={r['gpu_hours']:.2f} "
            f"(busy {r['useful_gpu_hours']:.2f})"
        )
    chosen = results["chosen"]
    print(
        f"autoscale_sim: jobs={len(jobs)} p50={chosen['p50_wait_s']:.0f}s "
        f"p95={chosen['p95_wait_s']:.0f}s shoot_p95={chosen['shoot_p95_wait_s']:.0f}s "
        f"gpu_hours={chosen['gpu_hours']:.2f} "
        f"target=8 poll=15s cooldown=300s start={args.start_s:.0f}s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
