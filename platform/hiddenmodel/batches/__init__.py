"""Batches: a shoot's photos submitted, followed and downloaded as one order."""
