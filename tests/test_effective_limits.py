"""An organization's effective limits have one statement, ``hm_effective_limits`` (migration
0020), and every reader goes through it: admission (``hm_submit_job``), the dispatcher
(``hm_claim_dispatch``), the limits view and the operator API.

The rule is checked through the function itself. That the readers use it is checked by
replacing it for one organization with an answer the rule would never give: each reader must
then follow the replacement, which one with a copy of the rule would not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection, Engine

from hiddenmodel import sqlfunctions
from hiddenmodel.settings import get_settings
from hiddenmodel.usage.service import ORG_LIMITS
from tests.conftest import (
    Account,
    Org,
    assert_problem,
    bearer,
    db_rows,
    make_key,
    make_org,
    register,
    superuser_url,
)
from tests.factories import submit

COLUMNS = ("plan_id", *ORG_LIMITS)
LIMITS = f"SELECT {', '.join(COLUMNS)} FROM hm_effective_limits(CAST(:o AS uuid))"


@pytest.fixture
def superuser() -> Iterator[Engine]:
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
async def operator(client: httpx.AsyncClient) -> Account:
    account = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=account.id)
    return account


def _limits(conn: Connection, org: str) -> dict[str, Any] | None:
    row = conn.execute(text(LIMITS), {"o": org}).mappings().one_or_none()
    return dict(row) if row else None


def _plan(conn: Connection, code: str) -> dict[str, Any]:
    row = conn.execute(
        text(f"SELECT id AS plan_id, {', '.join(ORG_LIMITS)} FROM plans WHERE code = :c"),
        {"c": code},
    ).mappings()
    return dict(row.one())


def _bill(conn: Connection, org: str, plan: str, **overrides: Any) -> None:
    conn.execute(
        text(
            "INSERT INTO org_billing (organization_id, plan_id, overrides) "
            "SELECT :o, id, CAST(:ov AS jsonb) FROM plans WHERE code = :p"
        ),
        {"o": org, "p": plan, "ov": json.dumps(overrides)},
    )


def test_the_functions_columns_are_the_organization_limits(superuser: Engine) -> None:
    with superuser.connect() as conn:
        columns = conn.execute(text("SELECT * FROM hm_effective_limits(gen_random_uuid())")).keys()
    assert tuple(columns) == COLUMNS


async def test_overrides_win_when_present_even_null_and_the_plan_gives_the_rest(
    client: httpx.AsyncClient, superuser: Engine
) -> None:
    """Each case in one rolled-back transaction: the plans are everyone's."""
    on_default, on_pro, overridden = [(await make_org(client)).id for _ in range(3)]
    with superuser.connect() as conn, conn.begin() as tx:
        # The default plan with limits of its own (the suite runs it unlimited).
        conn.execute(
            text(
                "UPDATE plans SET monthly_gpu_seconds = 11.5, monthly_images = 12, "
                "max_running_jobs = 13, max_queued_jobs = 14, storage_bytes = 15, "
                "requests_per_minute = 16, org_requests_per_minute = 17 WHERE is_default"
            )
        )
        conn.execute(text("UPDATE plans SET max_queued_jobs = NULL WHERE code = 'pro'"))
        default = _plan(conn, "free")
        pro = _plan(conn, "pro")
        assert pro["storage_bytes"] is not None and pro["max_running_jobs"] is not None
        _bill(conn, on_pro, "pro")
        _bill(
            conn,
            overridden,
            "pro",
            monthly_images=77,  # a number wins
            storage_bytes=None,  # null wins: unlimited, although the plan has a limit
            max_queued_jobs=5,  # the plan has none; the override gives one
            monthly_gpu_seconds=0.25,
        )

        # No plan of its own: the default plan's limits.
        assert _limits(conn, on_default) == default
        # A plan and no overrides: the plan's, nulls included.
        assert _limits(conn, on_pro) == pro
        # Overrides present win, even null; absent ones follow the plan.
        assert _limits(conn, overridden) == {
            **pro,
            "monthly_images": 77,
            "storage_bytes": None,
            "max_queued_jobs": 5,
            "monthly_gpu_seconds": 0.25,
        }
        # A plan's change reaches the organizations on it, and only the limits not overridden.
        conn.execute(
            text("UPDATE plans SET monthly_images = 1, max_running_jobs = 2 WHERE code = 'pro'")
        )
        changed = _limits(conn, overridden)
        assert changed is not None
        assert changed["monthly_images"] == 77 and changed["max_running_jobs"] == 2

        # A count written as a decimal or in exponent form (a hand edit, an older writer)
        # reads as the whole number it is instead of failing every reader.
        conn.execute(
            text(
                "UPDATE org_billing SET overrides = overrides || "
                '\'{"max_queued_jobs": 100.0, "storage_bytes": 1e6}\'::jsonb '
                "WHERE organization_id = :o"
            ),
            {"o": overridden},
        )
        written = _limits(conn, overridden)
        assert written is not None
        assert (written["max_queued_jobs"], written["storage_bytes"]) == (100, 1_000_000)

        # No default plan: an organization without a plan has none (and no limits); one with
        # a plan keeps it.
        conn.execute(text("UPDATE plans SET is_default = false WHERE is_default"))
        assert _limits(conn, on_default) == {name: None for name in COLUMNS}
        assert _limits(conn, on_pro) == {**pro, "monthly_images": 1, "max_running_jobs": 2}
        # No organization: no row.
        assert _limits(conn, str(uuid.uuid4())) is None
        tx.rollback()


async def test_a_tenant_session_reads_its_own_organizations_limits_only(
    client: httpx.AsyncClient,
) -> None:
    mine, theirs = [(await make_org(client)).id for _ in range(2)]
    db_rows(
        "INSERT INTO org_billing (organization_id, plan_id, overrides) "
        "SELECT :o, id, '{\"monthly_images\": 3}' FROM plans WHERE code = 'pro'",
        o=theirs,
    )
    app = create_engine(get_settings().database_url, poolclass=pool.NullPool)
    ops = create_engine(get_settings().database_ops_url, poolclass=pool.NullPool)
    try:
        with app.connect() as conn:
            conn.execute(text("SELECT set_config('app.org_id', :o, true)"), {"o": mine})
            assert _limits(conn, mine) is not None
            # Not the default plan's limits for want of the billing row RLS hides: no answer.
            assert _limits(conn, theirs) is None
        with ops.connect() as conn:
            seen = _limits(conn, theirs)
            assert seen is not None and seen["monthly_images"] == 3
    finally:
        app.dispose()
        ops.dispose()


# --- every reader follows the function -------------------------------------------------------

# For the organization under test only: limits no reading of its plan and overrides gives.
REPLACED = {
    "monthly_gpu_seconds": 12.5,
    "monthly_images": 30,
    "max_running_jobs": 1,
    "max_queued_jobs": 4,
    "storage_bytes": 10**9,
    "requests_per_minute": None,
    "org_requests_per_minute": None,
}
REAL_OVERRIDES = {"max_queued_jobs": 50, "monthly_images": 1000, "max_running_jobs": 10}


def _replace_for(org: str) -> str:
    """The function's file, answering REPLACED (on the 'free' plan) for ``org``."""
    source = sqlfunctions.latest_files()["hm_effective_limits"].read()
    tail = "     WHERE o.id = p_org\n$function$"
    assert source.count(tail) == 1
    values = ", ".join(
        f"CAST({'NULL' if v is None else v} AS {t})"
        for v, t in zip(
            REPLACED.values(),
            ("double precision", "integer", "integer", "integer", "bigint", "integer", "integer"),
            strict=True,
        )
    )
    return source.replace(
        tail,
        f"     WHERE o.id = p_org AND o.id <> '{org}'\n"
        "    UNION ALL\n"
        f"    SELECT p.id, {values}\n"
        "      FROM public.organizations o JOIN public.plans p ON p.code = 'free'\n"
        f"     WHERE o.id = p_org AND o.id = '{org}'\n$function$",
    )


def _define(engine: Engine, definition: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(definition, execution_options={"no_parameters": True})


async def _views(
    client: httpx.AsyncClient, org: Org, reader: dict[str, str], operator: Account
) -> dict[str, Any]:
    """The organization's limits as the limits view, the operator's organization view and an
    operator's plan change answer them, and its plan in each."""
    view = (await client.get("/v1/usage/limits", headers=reader)).json()
    admin = (await client.get(f"/v1/admin/orgs/{org.id}", headers=operator.headers)).json()
    put = await client.put(
        f"/v1/admin/orgs/{org.id}/plan",
        json={"plan": "pro", "overrides": REAL_OVERRIDES},
        headers=operator.headers,
    )
    assert put.status_code == 200, put.text
    shown = {x["name"]: x["limit"] for x in view["limits"] if x["subject"] == "org"}
    return {
        "view": ({n: shown[n] for n in shown}, view["plan"]),
        "admin": ({n: admin["limits"][n] for n in shown}, admin["plan"]),
        "put": {n: put.json()["limits"][n] for n in shown},
    }


def _plan_limits(code: str) -> dict[str, Any]:
    row = db_rows(f"SELECT {', '.join(ORG_LIMITS)} FROM plans WHERE code = :c", c=code)[0]
    return dict(zip(ORG_LIMITS, row, strict=True))


def _claimed(org: str) -> int:
    """Jobs of ``org`` one dispatcher wake would send, as the worker role (rolled back)."""
    worker = create_engine(get_settings().database_worker_url, poolclass=pool.NullPool)
    try:
        with worker.connect() as conn, conn.begin() as tx:
            rows = conn.execute(text("SELECT out_org FROM hm_claim_dispatch(4, 100000)")).all()
            tx.rollback()
    finally:
        worker.dispose()
    return sum(1 for row in rows if str(row.out_org) == org)


async def test_admission_dispatch_and_every_view_follow_the_function(
    client: httpx.AsyncClient, operator: Account, superuser: Engine, no_dispatch: Any
) -> None:
    org = await make_org(client)
    headers = bearer(
        (await make_key(client, org, ["jobs:read", "jobs:write", "usage:read"]))["key"]
    )
    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan",
        json={"plan": "pro", "overrides": REAL_OVERRIDES},
        headers=operator.headers,
    )
    assert r.status_code == 200, r.text
    real = {**_plan_limits("pro"), **REAL_OVERRIDES}

    # By the rule, every reader agrees.
    views = await _views(client, org, headers, operator)
    assert views["view"] == ({n: real[n] for n in views["put"]}, "pro")
    assert views["admin"] == views["view"] and views["put"] == views["view"][0]
    for _ in range(REPLACED["max_queued_jobs"]):  # within the real 50 and the replaced 4
        assert (await submit(client, headers)).status_code == 202
    assert _claimed(org.id) == 4  # the dispatcher's cap, below the real max_running_jobs (10)

    _define(superuser, _replace_for(org.id))
    try:
        views = await _views(client, org, headers, operator)
        assert views["view"] == ({n: REPLACED[n] for n in views["put"]}, "free")
        assert views["admin"] == views["view"] and views["put"] == views["view"][0]
        assert _claimed(org.id) == REPLACED["max_running_jobs"]
        # Four queued, the replaced max_queued_jobs: a fifth is refused (the real 50 admits it).
        refused = await submit(client, headers)
        assert_problem(refused, 429, "quota-exceeded")
        assert refused.json()["limit"] == "max_queued_jobs"
        assert refused.json()["limit_value"] == REPLACED["max_queued_jobs"]
    finally:
        _define(superuser, sqlfunctions.latest_files()["hm_effective_limits"].read())
    # The function is its file again, and the readers follow the rule again.
    assert (await submit(client, headers)).status_code == 202
    assert _claimed(org.id) == 4
