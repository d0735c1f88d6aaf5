"""Who may use the operator endpoints: signed-in platform operators (superusers)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends

from hiddenmodel.errors import Forbidden
from tenants.auth import CurrentPrincipal, accepts
from tenants.users import SESSION_SCHEME


@dataclass(frozen=True)
class Operator:
    user_id: uuid.UUID
    email: str


@accepts(SESSION_SCHEME)
async def require_operator(principal: CurrentPrincipal) -> Operator:
    """A signed-in superuser; 401 without credentials, 403 for anyone else.

    API keys belong to one organization and never act as operators, whoever created them.
    """
    if principal.api_key is not None:
        raise Forbidden(
            "Operator endpoints need a signed-in operator, not an API key.",
            kind="operator-required",
        )
    user = principal.user
    if user is None or not user.is_superuser:
        raise Forbidden("Only platform operators may do this.", kind="operator-required")
    return Operator(user_id=user.id, email=user.email)


OperatorDep = Annotated[Operator, Depends(require_operator)]
