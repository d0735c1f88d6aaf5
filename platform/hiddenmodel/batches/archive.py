"""A batch's outputs as one ZIP, written while it is sent.

``zipfile`` writes to a sink that cannot seek, so each member carries a data descriptor and
nothing is patched afterwards; every chunk written is handed to the response at once. Each
output is copied from S3 in chunks, so memory holds one chunk, never an image or the archive.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from hiddenmodel import storage
from hiddenmodel.batches.repository import ArchiveRow

CSV_NAME = "items.csv"
CSV_COLUMNS = (
    "position",
    "name",
    "status",
    "job_id",
    "error_code",
    "error_message",
    "needs_review",
    "quality_flags",
    "gpu_seconds",
    "files",
)


class _Sink:
    """A write-only, non-seekable file: what was written since the last drain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        return None

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def output_names(rows: list[ArchiveRow]) -> dict[tuple[int, str], str]:
    """Archive names of the outputs, after their inputs: ``shoot/sku1.jpg`` gives
    ``shoot/sku1.png`` (the main output) and ``shoot/sku1.alpha.png``; names are kept
    unique by appending the item's position when two inputs share a stem."""
    names: dict[tuple[int, str], str] = {}
    taken: set[str] = {CSV_NAME.casefold()}
    for row in rows:
        stem = str(PurePosixPath(row.name).with_suffix(""))
        for output in row.outputs:
            suffix = "" if output["name"] == "output" else f".{output['name']}"
            name = f"{stem}{suffix}.{output['format']}"
            if name.casefold() in taken:
                name = f"{stem}-{row.position}{suffix}.{output['format']}"
            taken.add(name.casefold())
            names[(row.position, output["name"])] = name
    return names


def _quality(report: dict[str, Any] | None) -> tuple[str, str]:
    if not report:
        return "", ""
    review = report.get("needs_review")
    reasons = report.get("reasons") or []
    return ("" if review is None else str(bool(review)).lower(), ";".join(map(str, reasons)))


def items_csv(rows: list[ArchiveRow], names: dict[tuple[int, str], str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        if row.item_error_code is not None:
            status, code, message = "rejected", row.item_error_code, row.item_error_message
        elif row.job_id is None or row.status is None:
            status, code, message = "pending", None, None
        else:
            status, code, message = row.status, row.error_code, row.error_message
        review, flags = _quality(row.report)
        files = [names[(row.position, o["name"])] for o in row.outputs]
        writer.writerow(
            (
                row.position,
                row.name,
                status,
                row.job_id or "",
                code or "",
                message or "",
                review,
                flags,
                "" if row.gpu_seconds is None else round(row.gpu_seconds, 4),
                ";".join(files),
            )
        )
    return out.getvalue().encode()


def stream(rows: list[ArchiveRow]) -> Iterator[bytes]:
    """The archive's bytes, chunk by chunk: ``items.csv`` first, then every output."""
    names = output_names(rows)
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:  # type: ignore[call-overload]
        archive.writestr(CSV_NAME, items_csv(rows, names), compress_type=zipfile.ZIP_DEFLATED)
        yield sink.drain()
        for row in rows:
            for output in row.outputs:
                info = zipfile.ZipInfo(names[(row.position, output["name"])])
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                with archive.open(info, mode="w", force_zip64=True) as member:
                    for chunk in storage.iter_object(output["key"]):
                        member.write(chunk)
                        yield sink.drain()
                yield sink.drain()
    yield sink.drain()
