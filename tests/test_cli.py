"""The ``hiddenmodel`` command, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.conftest import db_rows, db_scalar, make_org, unique

HIDDENMODEL = [sys.executable, "-m", "hiddenmodel.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HIDDENMODEL, *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
        check=False,
    )


def test_migrate_is_idempotent() -> None:
    r = _run("migrate")
    assert r.returncode == 0, r.stderr
    from alembic.script import ScriptDirectory

    from hiddenmodel.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert db_scalar("SELECT version_num FROM alembic_version") == head


def test_openapi_prints_the_document() -> None:
    r = _run("openapi")
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    assert "/v1/me" in spec["paths"]


def test_create_user_org_and_key() -> None:
    email = f"{unique()}@example.com"
    slug = unique("cli")
    r = _run("create-user", "--email", email, "--password", "Cli-password-42")
    assert r.returncode == 0, r.stderr
    r = _run("create-org", "--slug", slug, "--name", "CLI Org", "--owner-email", email)
    assert r.returncode == 0, r.stderr
    org_id = r.stdout.strip()
    r = _run("create-api-key", "--org", slug, "--name", "cli", "--scopes", "jobs:read")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("hmk_")
    assert (
        db_scalar(
            "SELECT count(*) FROM api_keys WHERE organization_id = :o AND scopes = '{jobs:read}'",
            o=org_id,
        )
        == 1
    )
    # Resolving the slug crossed tenants: it went through the audited ops door.
    assert (
        db_scalar(
            "SELECT count(*) FROM operator_audit_events "
            "WHERE actor = 'cli' AND detail->>'slug' = :s",
            s=slug,
        )
        == 1
    )
    r = _run("create-org", "--slug", slug, "--name", "Again", "--owner-email", email)
    assert r.returncode == 2 and "taken" in r.stderr
    r = _run("create-user", "--email", email, "--password", "weak")
    assert r.returncode == 2 and "at least" in r.stderr and "Traceback" not in r.stderr
    r = _run("create-user", "--email", email, "--password", "Cli-password-42")
    assert r.returncode == 2 and "exists" in r.stderr


async def test_up_demo_limits_are_set_once_and_an_operators_plan_is_kept(
    client: httpx.AsyncClient,
) -> None:
    """up's demo organization gets development limits when nobody assigned it a plan; a plan an
    operator assigned later is never overwritten by the next run of up."""
    from hiddenmodel import provisioning
    from hiddenmodel.up.demo import DEMO_LIMITS

    org = await make_org(client)

    async def limits() -> dict[str, Any]:
        r = await client.get(f"/v1/orgs/{org.id}/usage/limits", headers=org.owner.headers)
        assert r.status_code == 200, r.text
        return {x["name"]: x["limit"] for x in r.json()["limits"] if x["subject"] == "org"}

    overrides = "SELECT overrides FROM org_billing WHERE organization_id = :o"
    assert db_scalar(overrides, o=org.id) is None  # on the default plan, nothing assigned
    assert await provisioning.set_limits_if_unassigned(org.slug, DEMO_LIMITS) is True
    assert db_scalar(overrides, o=org.id) == DEMO_LIMITS
    now = await limits()
    assert now["monthly_images"] is None and now["monthly_gpu_seconds"] is None
    plan_cap = db_scalar("SELECT max_running_jobs FROM plans WHERE is_default")
    assert now["max_running_jobs"] == plan_cap  # caps stay the plan's
    # An operator's choice is kept by the next run.
    db_rows(
        "UPDATE org_billing SET overrides = CAST(:ov AS jsonb) WHERE organization_id = :o",
        ov='{"requests_per_minute": 7}',
        o=org.id,
    )
    assert await provisioning.set_limits_if_unassigned(org.slug, DEMO_LIMITS) is False
    assert db_scalar(overrides, o=org.id) == {"requests_per_minute": 7}


def test_a_worker_passes_its_prefetch_multiplier_to_celery(monkeypatch: Any) -> None:
    """``--prefetch-multiplier`` reaches the Celery worker's own option; without it, the
    app's default (1) applies. Out of range, the command refuses it."""
    from hiddenmodel import cli
    from workers.celery_app import app

    seen: list[list[str]] = []
    monkeypatch.setattr(app, "worker_main", lambda argv: seen.append(list(argv)))
    parser = cli.build_parser()
    assert cli._cmd_worker(parser.parse_args(["worker", "--queues", "cpu"])) == 0
    args = parser.parse_args(["worker", "--queues", "cpu", "--prefetch-multiplier", "2"])
    assert cli._cmd_worker(args) == 0
    assert "--prefetch-multiplier" not in seen[0]
    assert seen[1][seen[1].index("--prefetch-multiplier") + 1] == "2"
    assert app.conf.worker_prefetch_multiplier == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--prefetch-multiplier", "0"])
