"""An organization's effective limits, stated once: ``hm_effective_limits``.

The rule (the organization's plan, else the default plan; each limit replaced by the
organization's override when its key is present, even with null, which means unlimited) was
written out in ``hm_submit_job``, in ``hm_claim_dispatch`` and twice in Python (the limits view,
the operator API). It is now one SQL function that every one of them reads:

* ``hm_effective_limits(org)``: one row of every organization limit and the plan it comes
  from. Plain SQL, STABLE, run with the caller's rights (RLS: a tenant session sees its own
  organization's row, no other) and without a SET clause, so the planner inlines it into the
  query that calls it. Executable by the roles that read limits: the app (admission, the
  limits view, rate limits), operators, and the lookup role that owns ``hm_claim_dispatch``.
* ``hm_submit_job`` v3 and ``hm_claim_dispatch`` v4 read it instead of their own copies;
  what they admit and dispatch is unchanged.

Revision ID: 0020_effective_limits
Revises: 0019_totp
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

from hiddenmodel.migration_helpers import APP_ROLE, LOOKUP_ROLE, OPS_ROLE, create_function

revision: str = "0020_effective_limits"
down_revision: str | None = "0019_totp"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "hm_effective_limits(uuid)"


def upgrade() -> None:
    create_function("hm_effective_limits", 1)
    op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO {APP_ROLE}, {OPS_ROLE}, {LOOKUP_ROLE}")
    # CREATE OR REPLACE keeps each function's owner and grants.
    create_function("hm_submit_job", 3)
    create_function("hm_claim_dispatch", 4)


def downgrade() -> None:
    create_function("hm_claim_dispatch", 3)
    create_function("hm_submit_job", 2)
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
