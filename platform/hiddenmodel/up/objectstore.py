"""The embedded S3 server's storage: object bodies as files, their index in SQLite.

Under the store's folder (``var/s3`` for ``up``):

* ``index.sqlite3``: buckets, and per object its key, size, entity tag, SHA-256, content
  type, user metadata, tags, modification time and the file that holds its body;
* ``blobs/ab/<random name>``: one file per object version, written under a temporary name and
  renamed into place before the index names it, so a reader never sees half a body.

A put writes a new file and then swaps the index row in one transaction; the file it replaced
is removed afterwards (an open reader keeps it until it is done: POSIX unlink). Files that no
row names (a crash between the two steps) are removed when the store opens. Nothing is
fsynced: this is a development server, and after a power loss an object whose body did not
reach the disk is reported missing rather than served short. One server at a time keeps a
folder (a lock on ``.lock``). Entity tags are the first half of the body's SHA-256 (its MD5
when the request sent ``Content-MD5``), as S3's are for encrypted objects: opaque, not MD5s.

Bodies go to and from their files with direct I/O (``O_DIRECT``) where the file system takes
it, through a few page-aligned buffers the server keeps: an object is written once and read
once or twice soon after (a job's input by its worker, an output by its client), and keeping
it in the page cache only fills memory with pages nobody reads again. Each new page-cache page
also costs its first touch, which on a virtual machine whose host takes back free memory is
several times the copy itself. A file system without direct I/O (tmpfs on older kernels) gets
the same bytes through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    content_type TEXT NOT NULL,
    metadata TEXT NOT NULL,
    tags TEXT NOT NULL,
    modified REAL NOT NULL,
    blob TEXT NOT NULL,
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
"""
CHUNK = 1 << 20
# Direct I/O moves whole blocks at aligned offsets from aligned memory; 4 KiB covers the
# logical block size of every disk in use, and CHUNK is a multiple of it.
ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Buffers:
    """Page-aligned buffers of CHUNK bytes, lent out one per body in flight and kept for the
    next (at most ``keep``): memory touched once stays cheap to touch again."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextmanager
    def lend(self) -> Iterator[memoryview]:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = mmap.mmap(-1, CHUNK)
        try:
            with memoryview(buffer) as view:
                yield view
        finally:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buffer)
                    buffer = None
            if buffer is not None:
                buffer.close()


_BUFFERS = _Buffers()


def _open_direct(path: Path, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """``path`` opened with direct I/O where its file system takes it; whether it was."""
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def _without_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def _fill(source: Readable, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = source.readinto(view[got:])
        if not n:
            raise StoreError(
                400,
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length "
                "HTTP header.",
            )
        got += n


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_block(fd: int, buffer: memoryview, size: int, offset: int, direct: bool) -> bool:
    """Write ``buffer[:size]`` at ``offset``; a short last block goes out padded with zeros
    under direct I/O (the caller cuts the file to its length). Whether direct I/O still holds:
    a file system that opens files for it but refuses the write gets the plain write, of the
    whole block at the same offset, whatever part of it went out before the refusal."""
    if direct:
        padded = -(-size // ALIGN) * ALIGN
        buffer[size:padded] = bytes(padded - size)
        try:
            _write_all(fd, buffer[:padded], offset)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _without_direct(fd)
    _write_all(fd, buffer[:size], offset)
    return False


def open_body(path: Path) -> BinaryIO:
    """A stored body opened for :func:`read_body`, with direct I/O where the file system
    takes it."""
    fd, _ = _open_direct(path, os.O_RDONLY)
    return os.fdopen(fd, "rb", buffering=0)


def read_body(body: BinaryIO, start: int, end: int) -> Iterator[memoryview]:
    """Bytes ``[start, end)`` of a body from :func:`open_body`, in views of a lent buffer;
    each view is valid until the next is asked for. Under direct I/O the reads start at the
    aligned offset below ``start``."""
    fd = body.fileno()
    direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT)
    with _BUFFERS.lend() as buffer:
        pos = start - start % ALIGN if direct else start
        while pos < end:
            want = CHUNK if direct else min(CHUNK, end - pos)
            try:
                n = os.preadv(fd, [buffer[:want]], pos)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                _without_direct(fd)
                direct = False
                continue
            if n <= 0:
                return
            yield buffer[max(start - pos, 0) : min(end - pos, n)]
            pos += n


class StoreError(Exception):
    """A refusal S3 states with this code and HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    sha256: bytes
    content_type: str
    metadata: dict[str, str]
    tags: dict[str, str]
    modified: datetime
    blob: str


@dataclass(frozen=True)
class Written:
    """A body written to its file, not yet in the index."""

    blob: str
    size: int
    sha256: bytes
    md5: bytes | None


def _require_bucket(db: sqlite3.Connection, bucket: str) -> None:
    if not db.execute("SELECT 1 FROM buckets WHERE name = ?", (bucket,)).fetchone():
        raise StoreError(404, "NoSuchBucket", "The specified bucket does not exist")


def _info(row: tuple[Any, ...]) -> ObjectInfo:
    key, size, etag, sha256, content_type, metadata, tags, modified, blob = row
    return ObjectInfo(
        key=key,
        size=size,
        etag=etag,
        sha256=bytes(sha256),
        content_type=content_type,
        metadata=json.loads(metadata),
        tags=json.loads(tags),
        modified=datetime.fromtimestamp(modified, UTC),
        blob=blob,
    )


_SELECT = (
    "SELECT key, size, etag, sha256, content_type, metadata, tags, modified, blob FROM objects"
)
_GET = _SELECT + " WHERE bucket = ? AND key = ?"
_FROM_KEY = _SELECT + " WHERE bucket = ? AND key >= ? ORDER BY key LIMIT ?"
_AFTER_KEY = _SELECT + " WHERE bucket = ? AND key > ? ORDER BY key LIMIT ?"
_UPSERT = (
    "INSERT OR REPLACE INTO objects (bucket, key, size, etag, sha256, content_type, metadata, "
    "tags, modified, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        # One server per folder: a second would sweep the first one's bodies in flight.
        self._folder_lock = open(root / ".lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(self._folder_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._folder_lock.close()
            raise StoreError(
                409, "InUse", f"another S3 server keeps its objects in {root}"
            ) from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            root / "index.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._remove_unindexed_blobs()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._folder_lock.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _remove_unindexed_blobs(self) -> None:
        named = {row[0] for row in self._db.execute("SELECT blob FROM objects")}
        for path in self.blobs.glob("*/*"):
            if f"{path.parent.name}/{path.name}" not in named:
                path.unlink(missing_ok=True)

    def blob_path(self, blob: str) -> Path:
        return self.blobs / blob

    # --- buckets -------------------------------------------------------------------------

    def require_bucket(self, bucket: str) -> None:
        with self._lock:
            _require_bucket(self._db, bucket)

    def buckets(self) -> list[tuple[str, datetime]]:
        with self._lock:
            rows = self._db.execute("SELECT name, created FROM buckets ORDER BY name").fetchall()
        return [(name, datetime.fromtimestamp(created, UTC)) for name, created in rows]

    def create_bucket(self, bucket: str) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM buckets WHERE name = ?", (bucket,)).fetchone():
                raise StoreError(
                    409,
                    "BucketAlreadyOwnedByYou",
                    "Your previous request to create the named bucket succeeded and you "
                    "already own it.",
                )
            db.execute(
                "INSERT INTO buckets (name, created) VALUES (?, ?)",
                (bucket, datetime.now(UTC).timestamp()),
            )

    def delete_bucket(self, bucket: str) -> None:
        with self._transaction() as db:
            _require_bucket(db, bucket)
            if db.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1", (bucket,)).fetchone():
                raise StoreError(
                    409, "BucketNotEmpty", "The bucket you tried to delete is not empty"
                )
            db.execute("DELETE FROM buckets WHERE name = ?", (bucket,))

    # --- objects -------------------------------------------------------------------------

    def write_body(self, source: Readable, length: int, *, want_md5: bool = False) -> Written:
        """Copy ``length`` bytes of ``source`` to a new file, hashing them on the way; the file
        is removed again if anything fails."""
        name = secrets.token_hex(16)
        blob = f"{name[:2]}/{name}"
        path = self.blobs / blob
        path.parent.mkdir(exist_ok=True)
        sha = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False) if want_md5 else None
        tmp = path.with_name(f".{name}.tmp")
        try:
            fd, direct = _open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                with _BUFFERS.lend() as buffer:
                    written = 0
                    while written < length:
                        size = min(CHUNK, length - written)
                        _fill(source, buffer[:size])
                        sha.update(buffer[:size])
                        if md5 is not None:
                            md5.update(buffer[:size])
                        direct = _write_block(fd, buffer, size, written, direct)
                        written += size
                # Cut the zeros that padded a last block written directly.
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Written(
            blob=blob,
            size=length,
            sha256=sha.digest(),
            md5=md5.digest() if md5 is not None else None,
        )

    def discard(self, written: Written) -> None:
        (self.blobs / written.blob).unlink(missing_ok=True)

    def commit_object(
        self,
        bucket: str,
        key: str,
        written: Written,
        *,
        content_type: str,
        metadata: dict[str, str],
        tags: dict[str, str],
    ) -> ObjectInfo:
        """Name ``written`` as ``key``'s body; the body it replaces is removed."""
        etag = written.md5.hex() if written.md5 is not None else written.sha256.hex()[:32]
        modified = datetime.now(UTC)
        try:
            with self._transaction() as db:
                _require_bucket(db, bucket)
                old = db.execute(
                    "SELECT blob FROM objects WHERE bucket = ? AND key = ?", (bucket, key)
                ).fetchone()
                db.execute(
                    _UPSERT,
                    (
                        bucket,
                        key,
                        written.size,
                        etag,
                        written.sha256,
                        content_type,
                        json.dumps(metadata),
                        json.dumps(tags),
                        modified.timestamp(),
                        written.blob,
                    ),
                )
        except BaseException:
            self.discard(written)
            raise
        if old is not None:
            (self.blobs / old[0]).unlink(missing_ok=True)
        return ObjectInfo(
            key=key,
            size=written.size,
            etag=etag,
            sha256=written.sha256,
            content_type=content_type,
            metadata=metadata,
            tags=tags,
            modified=modified,
            blob=written.blob,
        )

    def head(self, bucket: str, key: str) -> ObjectInfo:
        with self._lock:
            row = self._db.execute(_GET, (bucket, key)).fetchone()
            if row is None:
                _require_bucket(self._db, bucket)
        if row is None:
            raise StoreError(404, "NoSuchKey", "The specified key does not exist.")
        return _info(row)

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """The object and its body, opened while the index still names it."""
        body = None
        with self._lock:
            row = self._db.execute(_GET, (bucket, key)).fetchone()
            if row is not None:
                try:
                    body = open_body(self.blobs / row[-1])
                except FileNotFoundError:
                    body = None
        if body is not None and os.fstat(body.fileno()).st_size != row[1]:
            # Bodies are not fsynced: after a power loss an index row can name a file that
            # lost its end. The object is gone; a short answer would leave the client waiting.
            body.close()
            body = None
        if row is None or body is None:
            self.require_bucket(bucket)
            raise StoreError(404, "NoSuchKey", "The specified key does not exist.")
        return _info(row), body

    def delete(self, bucket: str, key: str) -> None:
        """Delete ``key``; a missing key is no error (S3's delete is idempotent)."""
        with self._transaction() as db:
            _require_bucket(db, bucket)
            old = db.execute(
                "DELETE FROM objects WHERE bucket = ? AND key = ? RETURNING blob", (bucket, key)
            ).fetchone()
        if old is not None:
            (self.blobs / old[0]).unlink(missing_ok=True)

    def set_tags(self, bucket: str, key: str, tags: dict[str, str]) -> None:
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE objects SET tags = ? WHERE bucket = ? AND key = ?",
                (json.dumps(tags), bucket, key),
            ).rowcount
        if not updated:
            self.head(bucket, key)  # raises the right not-found error

    def list(
        self, bucket: str, *, prefix: str, after: str, limit: int, delimiter: str = ""
    ) -> tuple[list[ObjectInfo], list[str], bool, str]:
        """Objects and common prefixes after ``after``, in key order, ``limit`` in all;
        whether more follow, and the last key or prefix given (where the next page starts)."""
        self.require_bucket(bucket)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        start, inclusive = (prefix, True) if prefix > after else (after, False)
        if delimiter and after.startswith(prefix) and after.endswith(delimiter):
            cut = after.find(delimiter, len(prefix))
            if cut + len(delimiter) == len(after):
                # A page that ended on a common prefix: on from past every key under it.
                start, inclusive = _successor(after), True
        last = ""
        with self._lock:
            while True:
                wanted = limit - len(objects) - len(prefixes) + 1
                rows = self._db.execute(
                    _FROM_KEY if inclusive else _AFTER_KEY, (bucket, start, wanted)
                ).fetchall()
                for row in rows:
                    key = row[0]
                    if not key.startswith(prefix):
                        return objects, prefixes, False, last
                    if len(objects) + len(prefixes) == limit:
                        return objects, prefixes, True, last
                    cut = key.find(delimiter, len(prefix)) if delimiter else -1
                    if cut >= 0:
                        common = key[: cut + len(delimiter)]
                        prefixes.append(common)
                        last = common
                        # On from the first key past every key under the common prefix.
                        start, inclusive = _successor(common), True
                        break
                    objects.append(_info(row))
                    last, start, inclusive = key, key, False
                else:
                    if len(rows) < wanted:
                        return objects, prefixes, False, last


def _successor(prefix: str) -> str:
    """The least string above every string that starts with ``prefix``."""
    for i in range(len(prefix) - 1, -1, -1):
        if ord(prefix[i]) < 0x10FFFF:
            following = ord(prefix[i]) + 1
            return prefix[:i] + chr(0xE000 if 0xD800 <= following <= 0xDFFF else following)
    return prefix + "\U0010ffff"
