"""Log output: the human format, or one JSON object per line (``HM_LOG_FORMAT=json``) carrying
the request, organization and job a line was written for, so a log pipeline can follow one
job from its submit to its worker."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from hiddenmodel.requestid import current_request_id
from hiddenmodel.tenancy import current_org_id

current_job_id: ContextVar[uuid.UUID | None] = ContextVar("hm_current_job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def job_context(job_id: uuid.UUID) -> Iterator[None]:
    """Name ``job_id`` on every line logged inside the block."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (
            ("request_id", current_request_id),
            ("organization_id", current_org_id),
            ("job_id", current_job_id),
        ):
            value = var.get()
            if value is not None:
                line[key] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging for a ``hiddenmodel`` command; every library's logger propagates to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Python's warnings become log records too, rather than free text on stderr.
    logging.captureWarnings(fmt == "json")
