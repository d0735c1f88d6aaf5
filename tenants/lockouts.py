"""Account locks seen by organizations: an audit event where a member's account locks.

The locks themselves live in :mod:`hiddenmodel.authguard`; this module tells each
organization the locked account belongs to, so its owners learn of a guessing attack on a
member and can clear the lock (``DELETE /v1/orgs/{org_id}/sign-in-locks/{user_id}``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from hiddenmodel.authguard import Action, lock_duration
from hiddenmodel.clientip import client_address
from hiddenmodel.db import async_global_session, async_tenant_session, commit, rollback
from hiddenmodel.tenancy import current_user_id
from tenants import repository
from tenants.models import AuditEvent

LOCKED_ACTION = "member.sign_in_locked"
CLEARED_ACTION = "member.sign_in_lock_cleared"


async def record_account_lock(action: Action, email: str) -> None:
    """Append ``member.sign_in_locked`` to the audit log of every organization of the account
    named by ``email``; nothing when no account has that address."""
    async with async_global_session() as session:
        user = await repository.user_by_email(session, email)
        await commit(session)
    if user is None:
        return
    # Nobody is signed in: the lookup of the account's organizations acts for the locked
    # account (hm_user_organizations answers only for the user a transaction is bound to).
    bound = current_user_id.set(user.id)
    try:
        async with async_global_session() as session:
            orgs = await repository.user_organizations(session, user.id)
            await commit(session)
    finally:
        current_user_id.reset(bound)
    locked_until = datetime.now(UTC) + lock_duration()
    for row in orgs:
        async with async_tenant_session(row.organization_id) as tenant_session:
            try:
                repository.add_audit_event(
                    tenant_session,
                    AuditEvent(
                        organization_id=row.organization_id,
                        action=LOCKED_ACTION,
                        target_type="user",
                        target_id=str(user.id),
                        data={
                            "attempted": action.value,
                            "client_address": client_address(),
                            "locked_until": locked_until.isoformat(),
                        },
                    ),
                )
                await commit(tenant_session)
            except BaseException:
                await rollback(tenant_session)
                raise
