"""Usage metering, plans and quotas."""
