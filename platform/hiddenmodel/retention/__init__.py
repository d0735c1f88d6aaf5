"""Retention: how long a job's inputs and outputs are kept.

The plan sets a default (``plans.retention_days``; null keeps objects forever) and an
organization admin may shorten it (``org_retention``). A maintenance sweep deletes the
objects of jobs finished longer ago than that and marks the jobs expired; the rows stay
(billing history), usage events are never deleted, and a download of an expired output
answers 410 ``output-expired``. Where the S3 endpoint supports it, the bucket also carries
one lifecycle rule per organization on its ``tenant`` tag, a day behind the sweep, so objects
go even if the sweep stops.
"""
