"""Every SQL function from its file in ``migrations/sql``: the one home of its definition.

Until now a function's live body was in whichever migration last replaced it, each change
copying the whole body. From here each function's current definition is
``migrations/sql/<name>/vN.sql`` (the highest N). This migration loads version 1 of each
function the earlier migrations wrote inline: the definition they left, re-indented (and, in
``hm_submit_job``, two JSON initialisers typed as plpgsql_check asks; the same values). A later
change adds ``v2.sql`` and a migration that loads it (see docs/ARCHITECTURE.md);
``tests/test_sql_functions.py`` keeps the database and the files equal.

Revision ID: 0015_sql_function_files
Revises: 0014_retention
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from hiddenmodel.migration_helpers import create_function

revision: str = "0015_sql_function_files"
down_revision: str | None = "0014_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each function the earlier migrations wrote inline, and the version of its file that holds
# the definition they left (hm_claim_dispatch is loaded from its file since 0011 already).
FUNCTIONS = {
    "hm_api_key_for_request": 1,
    "hm_billing_customer_orgs": 1,
    "hm_claim_dispatch": 2,
    "hm_current_org_id": 1,
    "hm_jobs_to_reconcile": 1,
    "hm_org_by_stripe_customer": 1,
    "hm_quota_refusal": 1,
    "hm_running_jobs": 1,
    "hm_settle_job": 1,
    "hm_submit_job": 1,
    "hm_usage_events_due": 1,
    "hm_user_organizations": 1,
    "hm_webhook_deliveries_due": 1,
}


def upgrade() -> None:
    # CREATE OR REPLACE keeps each function's owner and grants.
    for name, version in FUNCTIONS.items():
        create_function(name, version)


def downgrade() -> None:
    # The files hold the same definitions as the migrations before this one (indentation
    # and literal types aside): nothing to undo.
    pass
