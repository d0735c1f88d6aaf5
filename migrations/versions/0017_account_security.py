"""Pending e-mail changes: a new address takes effect only once its confirmation link is used.

Like every other token hash, a link's hash is not readable by the app role: a link is looked
up by ``hm_email_change_by_token`` (the change without its hash), and a password change signs
the user's other sessions out through ``hm_access_tokens_end_others``, which acts only for the
user the transaction is bound to.

Revision ID: 0017_account_security
Revises: 0016_least_privilege
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from hiddenmodel.migration_helpers import APP_ROLE, LOOKUP_ROLE, OPS_ROLE, create_function

revision: str = "0017_account_security"
down_revision: str | None = "0016_least_privilege"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READABLE = "id, user_id, new_email, expires_at, confirmed_at, created_at"
FUNCTIONS = {
    "hm_email_change_by_token": "hm_email_change_by_token(varchar)",
    "hm_access_tokens_end_others": "hm_access_tokens_end_others(uuid, varchar)",
}


def upgrade() -> None:
    op.create_table(
        "email_changes",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "user_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("new_email", sa.String(320), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True)),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("token_hash", name="uq_email_changes_token_hash"),
    )
    op.create_index("ix_email_changes_user_id", "email_changes", ["user_id"])
    for role in (APP_ROLE, OPS_ROLE):
        op.execute(f"REVOKE SELECT ON email_changes FROM {role}")  # noqa: S608 (names above)
        op.execute(f"GRANT SELECT ({READABLE}) ON email_changes TO {role}")
    op.execute(f"GRANT SELECT ON email_changes TO {LOOKUP_ROLE}")
    for name, signature in FUNCTIONS.items():
        create_function(name, 1)
        op.execute(f"ALTER FUNCTION {signature} OWNER TO {LOOKUP_ROLE}")
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")


def downgrade() -> None:
    for signature in FUNCTIONS.values():
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_table("email_changes")
