"""What ``up`` prints once the platform is up and proven: where it answers, the demo login and
key, what the model is worth, the processes it runs and commands to try."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from hiddenmodel.processes import Children
from hiddenmodel.up.demo import DEMO_EMAIL, DEMO_IMAGE_FILE, DEMO_PASSWORD, GHOST_INTERIOR_FILE
from hiddenmodel.up.model import ModelPlan, model_lines


def _process_lines(children: Children) -> list[str]:
    lines = []
    for child in children.started:
        where = f"log {child.log_path}" if child.log_path is not None else "logs to this terminal"
        lines.append(f"  {child.name:<11} pid {child.pid!s:<8} {where}")
    return lines


def banner(
    base: str,
    key: str,
    ready: httpx.Response,
    me: httpx.Response,
    job_lines: list[str],
    children: Children,
    model: ModelPlan,
    photo_path: Path,
) -> str:
    org = me.json().get("organization") or {}
    params = json.dumps({"width": 512, "height": 512, "mode": "fit"}, separators=(",", ":"))
    ghost_params = json.dumps({"size": 1024, "steps": 30, "seed": 7}, separators=(",", ":"))
    ghost_try = [
        f"  curl -H 'Authorization: Bearer {key}' -H 'Prefer: wait=60' \\",
        f"    -F image=@{photo_path} -F interior=@{photo_path.with_name(GHOST_INTERIOR_FILE)} \\",
        "    -F operation=ghost_mannequin \\",
        f"    -F 'params={ghost_params}' {base}/v1/jobs",
    ]
    return "\n".join(
        [
            "",
            f"Hidden Model is up at {base}",
            f"  GET /readyz: {ready.status_code} {ready.text}",
            f"  GET /v1/me with the demo API key: {me.status_code}, "
            f"organization {org.get('slug')!r} ({org.get('id')})",
            *job_lines,
            "",
            *model_lines(model),
            "",
            f"  API docs:    {base}/docs",
            f"  Portal:      {base}/portal/ (sign in with the demo login)",
            f"  Demo login:  {DEMO_EMAIL} / {DEMO_PASSWORD}",
            f"  API key:     {key}",
            "",
            "Processes (Ctrl-C stops them all, newest first):",
            *_process_lines(children),
            "",
            "Try:",
            f"  curl -H 'Authorization: Bearer {key}' {base}/v1/me",
            f"  curl -H 'Authorization: Bearer {key}' -H 'Prefer: wait=10' \\",
            f"    -F image=@{photo_path.with_name(DEMO_IMAGE_FILE)} -F operation=resize \\",
            f"    -F 'params={params}' {base}/v1/jobs",
            *(ghost_try if model.path is not None else []),
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )
