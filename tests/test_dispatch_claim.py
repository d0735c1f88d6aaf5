"""The dispatcher's claim as one statement that is its own transaction
(``repository.claim_dispatch_sync`` over ``db.fetch_all_statement_sync``)."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.exc import DBAPIError

from hiddenmodel import db
from hiddenmodel.jobs import repository
from tests.conftest import db_rows, superuser_url
from tests.factories import keyed_org, submit


@pytest.mark.usefixtures("no_dispatch")
async def test_a_pass_claims_each_queued_job_once_and_commits_it(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    ids = {uuid.UUID((await submit(client, headers)).json()["id"]) for _ in range(2)}
    try:
        claimed = {c.job_id: c for c in repository.claim_dispatch_sync(4, 1000)}
        assert ids <= set(claimed)
        for job_id in ids:
            assert claimed[job_id].org_id == uuid.UUID(org.id)
            assert (claimed[job_id].queue, claimed[job_id].dispatch_count) == ("cpu", 1)
        # Committed when the statement returned: another connection sees it, and the jobs
        # left the outbox, so a second pass does not send them again.
        rows = db_rows(
            "SELECT id, dispatch_count, dispatched_at IS NOT NULL AS sent,"
            " (SELECT count(*) FROM job_outbox o WHERE o.job_id = j.id) AS in_outbox"
            " FROM jobs j WHERE id = ANY(:ids)",
            ids=list(ids),
        )
        assert {(r.dispatch_count, r.sent, r.in_outbox) for r in rows} == {(1, True, 0)}
        assert not ids & {c.job_id for c in repository.claim_dispatch_sync(4, 1000)}
    finally:
        for job_id in ids:  # queued, never sent: canceled, so no later test meets them
            await client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)


@pytest.mark.parametrize("commit_when_read", [False, True])
def test_pooled_connections_go_back_in_transactions(commit_when_read: bool) -> None:
    """Idle and out of autocommit again, after rows and after an error (in autocommit, or in a
    transaction that failed and must be rolled back first)."""
    how = {"commit_when_read": commit_when_read}
    for _ in range(3):
        rows = db.fetch_all_statement_sync("SELECT 1 UNION ALL SELECT 2", (), **how)
        assert rows == [(1,), (2,)]
    for _ in range(3):
        with pytest.raises(DBAPIError, match="division by zero"):
            db.fetch_all_statement_sync("SELECT 1 / 0", (), **how)
    engine = db.sync_engine()
    held = [engine.connect() for _ in range(max(1, engine.pool.checkedin()))]  # type: ignore[attr-defined]
    try:
        for conn in held:
            driver = conn.connection.driver_connection
            assert driver is not None and driver.autocommit is False
            assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            first = conn.execute(text("SELECT txid_current()")).scalar()
            assert conn.execute(text("SELECT txid_current()")).scalar() == first
            conn.rollback()
    finally:
        for conn in held:
            conn.close()


@pytest.mark.parametrize("commit_when_read", [False, True])
def test_a_statement_is_its_own_transaction_or_one_its_caller_commits(
    commit_when_read: bool,
) -> None:
    """In autocommit the statement is its transaction (it started with it). Committed when
    read, it runs in a transaction begun before it, which the caller commits once it has the
    rows: what it wrote is there for others when the call returns."""
    table = f"hm_test_{uuid.uuid4().hex[:12]}"
    db_rows(f"CREATE TABLE {table} (n int)")
    db_rows(f"GRANT INSERT, SELECT ON {table} TO hm_worker")
    try:
        sql = (
            f"WITH ins AS (INSERT INTO {table} VALUES (1) RETURNING n)"
            " SELECT n, now() = statement_timestamp() FROM ins"
        )
        how = {"commit_when_read": commit_when_read}
        ((n, alone),) = db.fetch_all_statement_sync(sql, (), **how)
        assert (n, alone) == (1, not commit_when_read)
        assert db_rows(f"SELECT count(*) FROM {table}")[0][0] == 1
    finally:
        db_rows(f"DROP TABLE {table}")


def test_a_dropped_connection_is_not_pooled_again() -> None:
    ((pid,),) = db.fetch_all_statement_sync("SELECT pg_backend_pid()", ())
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    engine.dispose()
    failures, invalidated = 0, False
    for _ in range(db.sync_engine().pool.size() + 1):  # type: ignore[attr-defined]
        try:
            ((seen,),) = db.fetch_all_statement_sync("SELECT pg_backend_pid()", ())
        except DBAPIError as exc:
            failures += 1
            invalidated = exc.connection_invalidated
            continue
        assert seen != pid
    assert failures <= 1 and (failures == 0 or invalidated)
