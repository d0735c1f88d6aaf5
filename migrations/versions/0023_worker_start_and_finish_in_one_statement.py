"""A worker's start and finish of a job, each in one statement.

A worker's claim was a transaction of four round trips (BEGIN, the organization's binding,
the UPDATE that wins the job, COMMIT) and its finish one of six (BEGIN, the binding, the
UPDATE that ends it, the settlement, the webhook endpoints, COMMIT), each through the ORM's
session. Now each usual case is one statement, without the session:

* ``hm_start_job(org, job, worker)``: binds the organization (local to the transaction) and,
  as the caller and so under row-level security, moves the job from queued to running while
  nothing holds it back (its deadline ahead, its organization not suspended); the job as
  JSON, or NULL, and then the worker looks at why the usual way (``workers.runner._claim``).
  The worker runs it in a transaction it commits once it has the job, so a worker that dies
  first (say while the claim waits on the row) leaves the job queued.
* ``hm_finish_succeeded_job(org, job, attempt, ...)``: binds the organization and, only for
  the attempt that owns the job, moves it from running to succeeded with its outputs and
  settles it (``hm_settle_job``) in the same transaction. The worker runs it in autocommit:
  the outputs are stored by then, so the end stands even if the worker dies meanwhile. When
  a webhook endpoint of the organization is subscribed to the event it does nothing and says
  so: the worker then ends the job the usual way, which records the deliveries with the new
  state.

Only the worker role may call them.

Revision ID: 0023_worker_one_statement
Revises: 0022_job_reads_in_one_statement
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

from hiddenmodel.migration_helpers import WORKER_ROLE, create_function

revision: str = "0023_worker_one_statement"
down_revision: str | None = "0022_job_reads_in_one_statement"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURES = {
    "hm_start_job": "hm_start_job(uuid, uuid, varchar)",
    "hm_finish_succeeded_job": (
        "hm_finish_succeeded_job(uuid, uuid, integer, jsonb, jsonb, double precision,"
        " double precision, double precision, double precision, integer, double precision,"
        " bigint)"
    ),
}


def upgrade() -> None:
    for name, signature in SIGNATURES.items():
        create_function(name, 1)
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {WORKER_ROLE}")


def downgrade() -> None:
    for signature in reversed(SIGNATURES.values()):
        op.execute(f"DROP FUNCTION {signature}")
