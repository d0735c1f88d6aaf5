"""Two-factor sign-in (TOTP) and the organization setting that requires it.

A member's TOTP secret is stored sealed with a key derived from ``HM_SECRET_KEY``, and
neither it nor the recovery codes' hashes are readable by the roles that serve requests or
operators (``hm_app``, ``hm_ops``): column privileges leave them out, as for every other
hash. Sign-in reads the sealed secret, and spends a recovery code, as ``hm_auth``.

Revision ID: 0019_totp
Revises: 0018_scale
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from hiddenmodel.migration_helpers import APP_ROLE, AUTH_ROLE, OPS_ROLE

revision: str = "0019_totp"
down_revision: str | None = "0018_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the app and operators may read of each table (everything but the secret and hashes).
READABLE = {
    "user_totp": "user_id, confirmed_at, last_used_step, created_at",
    "totp_recovery_codes": "id, user_id, used_at, created_at",
}


def upgrade() -> None:
    op.add_column(
        "organizations",
        sa.Column("require_two_factor", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "user_totp",
        sa.Column(
            "user_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True)),
        # The last time step a code was accepted for: a code is never accepted twice.
        sa.Column("last_used_step", sa.BigInteger()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "totp_recovery_codes",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "user_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True)),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("user_id", "code_hash", name="uq_totp_recovery_codes_user_hash"),
    )
    for table, columns in READABLE.items():
        for role in (APP_ROLE, OPS_ROLE):
            op.execute(f"REVOKE SELECT ON {table} FROM {role}")  # noqa: S608 (names above)
            op.execute(f"GRANT SELECT ({columns}) ON {table} TO {role}")
    op.execute(
        f"GRANT SELECT (user_id, secret_ciphertext, confirmed_at, last_used_step) "
        f"ON user_totp TO {AUTH_ROLE}"
    )
    op.execute(f"GRANT UPDATE (last_used_step, secret_ciphertext) ON user_totp TO {AUTH_ROLE}")
    op.execute(
        f"GRANT SELECT (id, user_id, code_hash, used_at) ON totp_recovery_codes TO {AUTH_ROLE}"
    )
    op.execute(f"GRANT UPDATE (used_at) ON totp_recovery_codes TO {AUTH_ROLE}")


def downgrade() -> None:
    op.drop_table("totp_recovery_codes")
    op.drop_table("user_totp")
    op.drop_column("organizations", "require_two_factor")
