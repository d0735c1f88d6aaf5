"""HTTP of billing: the organization's plan, checkout and portal links; Stripe's webhook; the
operators' reconciliation report."""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, status

from hiddenmodel.admin.auth import OperatorDep
from hiddenmodel.billing import service
from hiddenmodel.billing.models import ReconciliationStatus
from hiddenmodel.billing.schemas import (
    BillingRead,
    CheckoutCreate,
    CheckoutRead,
    PortalRead,
    ReconciliationRead,
    StripeWebhookReceipt,
)
from tenants.auth import OrgScope, requires

router = APIRouter(prefix="/v1", tags=["billing"])

ManageBilling = Annotated[OrgScope, Depends(requires(service.MANAGE_BILLING))]


@router.get("/orgs/{org_id}/billing", operation_id="getBilling", response_model=BillingRead)
async def get_billing(scope: ManageBilling) -> BillingRead:
    """The plan, the Stripe subscription's status and any unpaid invoice's start."""
    return await service.view(scope)


@router.post(
    "/orgs/{org_id}/billing/checkout",
    operation_id="createBillingCheckout",
    status_code=status.HTTP_201_CREATED,
    response_model=CheckoutRead,
)
async def create_checkout(data: CheckoutCreate, scope: ManageBilling) -> CheckoutRead:
    """A Stripe Checkout link that subscribes the organization to a plan."""
    return await service.start_checkout(scope, data.plan)


@router.post(
    "/orgs/{org_id}/billing/portal",
    operation_id="createBillingPortalSession",
    status_code=status.HTTP_201_CREATED,
    response_model=PortalRead,
)
async def create_portal_session(scope: ManageBilling) -> PortalRead:
    """A link to Stripe's customer portal: payment methods, invoices, cancellation."""
    return await service.open_portal(scope)


@router.post(
    "/stripe/webhook", operation_id="receiveStripeWebhook", response_model=StripeWebhookReceipt
)
async def receive_stripe_webhook(
    request: Request, stripe_signature: Annotated[str | None, Header()] = None
) -> StripeWebhookReceipt:
    """Stripe's events, authenticated by the ``Stripe-Signature`` header (no bearer token)."""
    return await service.receive_stripe_event(await request.body(), stripe_signature)


@router.get(
    "/admin/billing/reconciliations",
    operation_id="listBillingReconciliations",
    response_model=list[ReconciliationRead],
    tags=["admin"],
)
async def list_reconciliations(
    operator: OperatorDep,
    day: date | None = None,
    outcome: Annotated[ReconciliationStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[ReconciliationRead]:
    """Daily comparisons of the usage sent with Stripe's meter (operators only)."""
    return await service.list_reconciliations(
        operator, day, outcome.value if outcome else None, limit
    )
