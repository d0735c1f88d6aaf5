"""How long a job waits after its worker dies, under the operator's worst day.

Runs the scenario of ``tests/chaos.py`` (the same one ``tests/test_chaos.py`` asserts on)
``--runs`` times, each on a fresh private stack: its own PostgreSQL cluster (``initdb`` into
a temporary folder), its own Redis, moto's S3, the API, the dispatcher and two workers.
Jobs go in as fast as the API takes them while a worker is killed with SIGKILL every second
whenever both are up, Redis is flushed once and PostgreSQL restarted once
(``pg_ctl restart -m immediate``).

For every job a killed worker was running or had received, it measures the time from the
kill to the job running again (its next attempt's ``started_at``). Prints one JSON line per
run, then the percentiles over every measured recovery of every run:

    python bench/recovery.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import chaos


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    recoveries: list[float] = []
    runs = []
    for run in range(1, args.runs + 1):
        stack = chaos.Stack()
        chaos.stop_signal_safe(stack)
        stack.start()
        try:
            result = asyncio.run(chaos.run(stack, jobs=args.jobs))
        finally:
            stack.stop()
        summary = {"run": run, **result.summary()}
        runs.append(summary)
        print(json.dumps(summary, default=str), flush=True)
        recoveries += result.recoveries
    total = {
        "runs": args.runs,
        "measured": len(recoveries),
        "p50_s": round(percentile(recoveries, 50), 2) if recoveries else None,
        "p90_s": round(percentile(recoveries, 90), 2) if recoveries else None,
        "p99_s": round(percentile(recoveries, 99), 2) if recoveries else None,
        "max_s": round(max(recoveries), 2) if recoveries else None,
    }
    print(json.dumps(total), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": runs, "total": total}, default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
