"""Billing with Stripe: customers, checkout and portal, usage pushed as meter events,
Stripe's webhooks, and the daily reconciliation of what we sent with what Stripe counted."""
