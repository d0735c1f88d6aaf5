"""Operator endpoints: plans, each organization's plan and overrides, usage across tenants.

Every read and write goes through :func:`hiddenmodel.db.ops_session`, so each call is recorded
in ``operator_audit_events`` with the operator's e-mail.
"""
