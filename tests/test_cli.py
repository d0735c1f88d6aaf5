"""The ``hiddenmodel`` command, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import db_scalar, unique

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
