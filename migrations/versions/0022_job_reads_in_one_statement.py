"""A job read with an API key in one statement: ``hm_job_for_key_request``.

``GET /v1/jobs/{id}`` is what a client polls while its job runs, several times a job. It was
four round trips in a transaction (BEGIN; the key, which binds the organization; the job,
with its queue position in a fifth when queued; COMMIT). Now it is one statement outside any
transaction (autocommit), which is its own transaction:

* ``hm_queue_positions(org, ids, created)``: a page of jobs' queue positions, the statement
  ``hiddenmodel.jobs.repository.queue_positions`` ran (migration 0021), now stated once for
  it and for the function below. As the caller, so row-level security applies.
* ``hm_job_for_key_request(org, key_hash, job)``: the key and its organization through
  ``hm_api_key_for_request`` (which binds the organization, local to the transaction), then,
  as the caller and so under row-level security, the job and its queue position. No row
  without a key; the key's checks (revoked, expired, scope, suspension) stay in
  ``tenants.auth``, which goes the usual way whenever one of them would refuse.

Revision ID: 0022_job_reads_in_one_statement
Revises: 0021_queue_minutes
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

from hiddenmodel.migration_helpers import APP_ROLE, create_function

revision: str = "0022_job_reads_in_one_statement"
down_revision: str | None = "0021_queue_minutes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURES = (
    "hm_queue_positions(uuid, uuid[], timestamptz[])",
    "hm_job_for_key_request(uuid, varchar, uuid)",
)


def upgrade() -> None:
    create_function("hm_queue_positions", 1)
    create_function("hm_job_for_key_request", 1)
    for signature in SIGNATURES:
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")


def downgrade() -> None:
    for signature in reversed(SIGNATURES):
        op.execute(f"DROP FUNCTION {signature}")
