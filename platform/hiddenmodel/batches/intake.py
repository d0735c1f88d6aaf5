"""Items into a batch: from many uploaded files or one ZIP, with an optional manifest.

The manifest (``manifest.csv``) names, per row, the photo (``image``), its optional
``mask``, ``body_mask`` and ``interior`` frame, and the row's ``params`` (a JSON object laid
over the batch's). Without one, every photo is an item of its own.

Everything about the upload as a whole (names, archive structure, sizes, the manifest, the
params) is checked before anything is stored, and a refusal stores nothing. A photo that is
only damaged (truncated, too many pixels, a mask of the wrong size) does not refuse the
upload: its item is kept as rejected, with the reason, and never becomes a job. Accepted
files are stored in S3 as they are read, and deleted again if anything fails later.

Blocking work (inflating, decoding, S3): callers run :func:`take` in a worker thread.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from hiddenmodel import storage
from hiddenmodel.batches.zipintake import (
    MANIFEST_NAME,
    ArchiveRefused,
    check_content,
    check_file_name,
    skipped,
)
from hiddenmodel.errors import Problem
from hiddenmodel.images import ImageInfo, ImageRejected, configured_limits, content_type
from hiddenmodel.images import inspect_image as inspect
from hiddenmodel.inputs import JsonRefused, parse_json
from hiddenmodel.jobs.operations import Operation

ROLES = ("image", "mask", "body_mask", "interior")
MANIFEST_COLUMNS = frozenset({*ROLES, "params"})
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class Source(Protocol):
    """Named files, read one at a time."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...

    def read_manifest(self, max_bytes: int) -> bytes | None: ...


class FilesSource:
    """Files of a multipart upload (spooled by the server), and an optional manifest."""

    def __init__(
        self, files: list[tuple[str, IO[bytes]]], manifest: IO[bytes] | None, max_bytes: int
    ) -> None:
        self.max_bytes = max_bytes
        self._manifest = manifest
        self._files: dict[str, IO[bytes]] = {}
        folded: set[str] = set()
        for name, fileobj in files:
            if skipped(name):
                continue
            check_file_name(name, manifest_allowed=False)
            if name.casefold() in folded:
                raise ArchiveRefused(
                    "archive-duplicate-name", f"{name}: another file has the same name.", entry=name
                )
            folded.add(name.casefold())
            self._files[name] = fileobj

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> bytes:
        data = self._files[name].read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise ArchiveRefused(
                "archive-member-too-large",
                f"{name}: larger than {self.max_bytes} bytes.",
                entry=name,
                status=413,
            )
        check_content(name, data[:512])
        return data

    def read_manifest(self, max_bytes: int) -> bytes | None:
        if self._manifest is None:
            return None
        data = self._manifest.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ArchiveRefused(
                "manifest-invalid",
                f"{MANIFEST_NAME}: larger than {max_bytes} bytes.",
                entry=MANIFEST_NAME,
                status=413,
            )
        return data


@dataclass
class Planned:
    """One item to be: its files by role and its own params."""

    name: str
    files: dict[str, str]
    params: dict[str, Any]
    row: str


def _manifest_problem(detail: str, row: str) -> ArchiveRefused:
    return ArchiveRefused("manifest-invalid", f"{MANIFEST_NAME}, {row}: {detail}", entry=row)


def plan(source: Source, op: Operation) -> list[Planned]:
    """Group the files into items: by the manifest, or one item per photo."""
    names = source.names()
    raw = source.read_manifest(MAX_MANIFEST_BYTES)
    if raw is None:
        return [Planned(name=n, files={"image": n}, params={}, row=n) for n in names]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _manifest_problem("not UTF-8 text.", "header") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except (StopIteration, csv.Error) as exc:
        raise _manifest_problem("no header row.", "header") from exc
    unknown = [h for h in header if h not in MANIFEST_COLUMNS]
    if unknown or "image" not in header or len(set(header)) != len(header):
        raise _manifest_problem(
            f"the columns must be 'image' and any of {sorted(MANIFEST_COLUMNS - {'image'})}, "
            f"each once; got {header}.",
            "header",
        )
    allowed = {"image", *op.extra_inputs}
    present = set(names)
    used: dict[str, str] = {}
    items: list[Planned] = []
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise _manifest_problem(f"not valid CSV ({exc}).", "header") from exc
    for number, values in enumerate(rows, start=2):
        row = f"row {number}"
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise _manifest_problem(f"{len(values)} fields for {len(header)} columns.", row)
        cells = {h: v.strip() for h, v in zip(header, values, strict=True)}
        files: dict[str, str] = {}
        for role in ROLES:
            member = cells.get(role, "")
            if not member:
                continue
            if role not in allowed:
                raise _manifest_problem(f"operation '{op.name}' takes no '{role}' input.", row)
            if member not in present:
                raise _manifest_problem(f"'{member}' is not in the upload.", row)
            if member in used:
                raise _manifest_problem(f"'{member}' is already used by {used[member]}.", row)
            used[member] = row
            files[role] = member
        if "image" not in files:
            raise _manifest_problem("the 'image' column is empty.", row)
        params: dict[str, Any] = {}
        if cells.get("params"):
            try:
                params = parse_json(cells["params"])
            except JsonRefused as exc:
                raise _manifest_problem(f"'params' is refused: {exc}.", row) from exc
            if not isinstance(params, dict):
                raise _manifest_problem("'params' must be a JSON object.", row)
        items.append(Planned(name=files["image"], files=files, params=params, row=row))
    unused = [n for n in names if n not in used]
    if unused:
        raise ArchiveRefused(
            "manifest-unreferenced-member",
            f"{unused[0]}: in the upload but in no row of {MANIFEST_NAME}.",
            entry=unused[0],
        )
    return items


@dataclass
class TakenItem:
    """An item read, checked and (unless rejected) stored."""

    id: uuid.UUID
    job_id: uuid.UUID
    name: str
    params: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    gpu_seconds: float = 0.0
    images: int = 0
    error_code: str | None = None
    error_message: str | None = None


@dataclass
class Taken:
    items: list[TakenItem]
    keys: list[str]


def item_key(
    org_id: uuid.UUID, batch_id: uuid.UUID, item_id: uuid.UUID, role: str, ext: str
) -> str:
    return f"orgs/{org_id}/batches/{batch_id}/{item_id}/{role}.{ext}"


def validate_params(op: Operation, base: dict[str, Any], planned: list[Planned]) -> list[Any]:
    """Each item's params (the batch's, the row's over them), validated; refused whole."""
    models: list[Any] = []
    for item in planned:
        try:
            models.append(op.validate_params({**base, **item.params}))
        except Problem as exc:
            exc.detail = f"{item.row}: {exc.detail}"
            exc.extra["entry"] = item.row
            raise
    return models


def take(
    source: Source,
    op: Operation,
    planned: list[Planned],
    params_models: list[Any],
    *,
    org_id: uuid.UUID,
    batch_id: uuid.UUID,
) -> Taken:
    """Read, check and store each item's files. Raises :class:`ArchiveRefused` with nothing
    left stored; a damaged photo only rejects its item."""
    limits = configured_limits()
    keys: list[str] = []
    items: list[TakenItem] = []
    try:
        for item, model in zip(planned, params_models, strict=True):
            taken = TakenItem(
                id=uuid.uuid4(),
                job_id=uuid.uuid4(),
                name=item.name,
                params=model.model_dump(mode="json"),
            )
            items.append(taken)
            infos: dict[str, ImageInfo] = {}
            blobs: dict[str, bytes] = {}
            for role, member in item.files.items():
                data = source.read(member)
                if taken.error_code is not None:
                    continue  # still read: a hostile member refuses the upload all the same
                try:
                    infos[role] = inspect(data, limits)
                    blobs[role] = data
                except ImageRejected as exc:
                    taken.error_code = exc.kind
                    taken.error_message = f"{member}: {exc.detail}"
            if taken.error_code is None:
                _check_sizes(taken, item, infos, op)
            if taken.error_code is not None:
                continue
            estimate = op.estimate(model, infos["image"].width, infos["image"].height)
            taken.gpu_seconds, taken.images = estimate.gpu_seconds, estimate.images
            for role, data in blobs.items():
                info = infos[role]
                key = item_key(org_id, batch_id, taken.id, role, info.format)
                digest = hashlib.sha256(data).digest()
                storage.put_object(
                    key,
                    data,
                    content_type(info.format),
                    org_id=org_id,
                    job_id=taken.job_id,
                    kind=role,
                    sha256=digest,
                )
                keys.append(key)
                taken.inputs[role] = {
                    "key": key,
                    "format": info.format,
                    "width": info.width,
                    "height": info.height,
                    "bytes": len(data),
                    "content_type": content_type(info.format),
                    "sha256": digest.hex(),
                    "filename": item.files[role],
                }
    except BaseException:
        storage.delete_objects(keys)
        raise
    return Taken(items=items, keys=keys)


def _check_sizes(
    taken: TakenItem, item: Planned, infos: dict[str, ImageInfo], op: Operation
) -> None:
    image = infos["image"]
    too_small = op.check_input_size(image.width, image.height)
    if too_small:
        taken.error_code = "image-too-small"
        taken.error_message = f"{item.files['image']}: {too_small}"
        return
    for role in ("mask", "body_mask"):
        mask = infos.get(role)
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            taken.error_code = "mask-size-mismatch"
            taken.error_message = (
                f"{item.files[role]}: the {role} is {mask.width}x{mask.height}; "
                f"the image is {image.width}x{image.height}."
            )
