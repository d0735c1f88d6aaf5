"""Least privilege inside PostgreSQL: no readable secrets, no foreign answers.

The app role (every API request) could read every user's password hash and every session,
API-key and invitation token hash, and could run the worker sweeps that read and move rows
of every organization. One SQL injection or one bug reached all of it.

* ``hm_app`` (and ``hm_ops``) may read every column of ``users``, ``access_tokens``,
  ``api_keys`` and ``invitations`` but the hashes. Lookups by hash go through definer functions that return
  a verdict (a user id, a key without its hash, an invitation id), never the hash. Sign-in
  reads a password hash as ``hm_auth``, a role that may read ``users (id, hashed_password)``
  and nothing else.
* The cross-tenant sweeps (dispatch, reconcile, worker liveness, retention, webhook and
  usage scans) are executable by ``hm_worker`` alone, the role of the worker processes.
* ``hm_user_organizations`` answers only for the user the transaction is bound to
  (``app.user_id``).

Revision ID: 0016_least_privilege
Revises: 0015_sql_function_files
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from hiddenmodel.migration_helpers import (
    APP_ROLE,
    AUTH_ROLE,
    LOOKUP_ROLE,
    OPS_ROLE,
    WORKER_ROLE,
    create_function,
)

revision: str = "0016_least_privilege"
down_revision: str | None = "0015_sql_function_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each table and the columns of it the app role may not read.
SECRET_COLUMNS = {
    "users": ("hashed_password",),
    "access_tokens": ("token_hash",),
    "api_keys": ("key_hash",),
    "invitations": ("token_hash",),
}

WORKER_FUNCTIONS = (
    "hm_claim_dispatch(integer, integer)",
    "hm_jobs_to_reconcile(double precision, double precision, double precision)",
    "hm_running_jobs()",
    "hm_usage_events_due(integer)",
    "hm_billing_customer_orgs()",
    "hm_webhook_deliveries_due(double precision, integer)",
    "hm_jobs_past_retention(timestamp with time zone, integer)",
    "hm_retention_by_org()",
)

# The verdict functions the app calls instead of reading a hash.
VERDICT_FUNCTIONS = {
    "hm_access_token_user": "hm_access_token_user(varchar, timestamp with time zone)",
    "hm_access_token_delete": "hm_access_token_delete(varchar)",
    "hm_invitation_by_token": "hm_invitation_by_token(varchar)",
}


def _readable_columns(table: str) -> list[str]:
    rows = op.get_bind().execute(
        text(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    )
    return [r[0] for r in rows if r[0] not in SECRET_COLUMNS[table]]


def upgrade() -> None:
    op.execute(f"GRANT USAGE ON SCHEMA public TO {WORKER_ROLE}, {AUTH_ROLE}")

    # Column privileges: a table-wide SELECT would include the hashes. Operators (hm_ops)
    # have no use for them either.
    for table in SECRET_COLUMNS:
        columns = ", ".join(f'"{c}"' for c in _readable_columns(table))
        for role in (APP_ROLE, OPS_ROLE):
            op.execute(f"REVOKE SELECT ON {table} FROM {role}")  # noqa: S608 (names above)
            op.execute(f"GRANT SELECT ({columns}) ON {table} TO {role}")
    op.execute(f"GRANT SELECT (id, hashed_password) ON users TO {AUTH_ROLE}")

    # The verdict functions run as hm_lookup, which may read the hashes.
    op.execute(f"GRANT SELECT ON api_keys, invitations TO {LOOKUP_ROLE}")
    op.execute(f"GRANT SELECT, DELETE ON access_tokens TO {LOOKUP_ROLE}")
    for name, signature in VERDICT_FUNCTIONS.items():
        create_function(name, 1)
        op.execute(f"ALTER FUNCTION {signature} OWNER TO {LOOKUP_ROLE}")
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")

    # Now a definer function (it returns the key without its hash); it binds the
    # organization itself and reads that organization's key only.
    create_function("hm_api_key_for_request", 2)
    op.execute(f"ALTER FUNCTION hm_api_key_for_request(uuid, varchar) OWNER TO {LOOKUP_ROLE}")
    op.execute("REVOKE ALL ON FUNCTION hm_api_key_for_request(uuid, varchar) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION hm_api_key_for_request(uuid, varchar) TO {APP_ROLE}")

    create_function("hm_user_organizations", 2)

    for signature in WORKER_FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC, {APP_ROLE}")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {WORKER_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    for signature in WORKER_FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM {WORKER_ROLE}")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")
    create_function("hm_user_organizations", 1)
    op.execute("DROP FUNCTION hm_api_key_for_request(uuid, varchar)")
    create_function("hm_api_key_for_request", 1)
    op.execute(f"GRANT EXECUTE ON FUNCTION hm_api_key_for_request(uuid, varchar) TO {APP_ROLE}")
    for signature in VERDICT_FUNCTIONS.values():
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(f"REVOKE ALL ON access_tokens, api_keys, invitations FROM {LOOKUP_ROLE}")
    op.execute(f"REVOKE ALL ON users FROM {AUTH_ROLE}")
    for table in SECRET_COLUMNS:
        op.execute(f"GRANT SELECT ON {table} TO {APP_ROLE}, {OPS_ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {WORKER_ROLE}, {AUTH_ROLE}")
