"""Reading an uploaded ZIP as hostile input.

Every member name, type and size is checked from the central directory before anything is
read, and sizes are checked again while each member is inflated, because a header may lie:
a member is read in chunks and refused as soon as it outgrows its own limit, its ratio to its
compressed size, or the archive's total. Each refusal is an :class:`ArchiveRefused` naming
the entry; the caller stores nothing until the whole archive has passed.
"""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

CHUNK = 64 * 1024
# Below this many inflated bytes a high ratio is only a well-compressible small file.
RATIO_FLOOR_BYTES = 1024 * 1024
MAX_NAME_LENGTH = 512

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
ARCHIVE_EXTENSIONS = frozenset(
    {".zip", ".jar", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar",
     ".zst", ".lz", ".lzma", ".z", ".cpio", ".cab", ".iso"}
)  # fmt: skip
_ARCHIVE_MAGIC = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"PK\x07\x08",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"\x28\xb5\x2f\xfd",
)
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Files operating systems add to archives on their own; they are skipped, not refused.
_SKIPPED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
MANIFEST_NAME = "manifest.csv"


class ArchiveRefused(Exception):
    """An archive or upload that is refused whole. ``entry`` names the member at fault."""

    def __init__(self, kind: str, detail: str, *, entry: str | None, status: int = 422) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.entry = entry
        self.status = status


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int
    max_total_bytes: int
    max_member_bytes: int
    max_ratio: float


def check_name(name: str) -> None:
    """Refuse a member or file name that could leave the folder it is unpacked into."""
    if not name or len(name) > MAX_NAME_LENGTH or _CONTROL.search(name) or "\\" in name:
        raise ArchiveRefused(
            "archive-unsafe-name",
            f"{name}: names must be 1 to {MAX_NAME_LENGTH} characters, with no control "
            "characters or backslashes.",
            entry=name,
        )
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveRefused(
            "archive-absolute-path", f"{name}: absolute paths are not allowed.", entry=name
        )
    if ".." in name.split("/"):
        raise ArchiveRefused(
            "archive-path-traversal", f"{name}: '..' in a path is not allowed.", entry=name
        )


def skipped(name: str) -> bool:
    """Operating-system litter (resource forks, folder settings), ignored without error."""
    base = PurePosixPath(name).name
    return name.startswith("__MACOSX/") or base in _SKIPPED_NAMES or base.startswith("._")


def extension(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def check_content(name: str, head: bytes) -> None:
    """Refuse a member whose bytes are an archive or plainly not a photo. (A photo that is
    only damaged is the item's problem, reported per item, not the archive's.)"""
    if head.startswith(_ARCHIVE_MAGIC) or head[257:262] == b"ustar":
        raise ArchiveRefused(
            "archive-nested", f"{name}: archives inside the archive are not accepted.", entry=name
        )
    is_webp = len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if not (head.startswith(_IMAGE_MAGIC) or is_webp):
        raise ArchiveRefused(
            "archive-member-not-image",
            f"{name}: not a PNG, JPEG or WEBP image.",
            entry=name,
        )


def check_file_name(name: str, *, manifest_allowed: bool) -> None:
    """A member's or upload's name: safe, not an archive, an image (or the manifest)."""
    check_name(name)
    ext = extension(name)
    if ext in ARCHIVE_EXTENSIONS:
        raise ArchiveRefused(
            "archive-nested", f"{name}: archives inside the archive are not accepted.", entry=name
        )
    if manifest_allowed and name.lower() == MANIFEST_NAME:
        return
    if ext not in IMAGE_EXTENSIONS:
        raise ArchiveRefused(
            "archive-member-not-image",
            f"{name}: only .png, .jpg, .jpeg and .webp files are accepted"
            + (f" (and {MANIFEST_NAME} at the top)." if manifest_allowed else "."),
            entry=name,
        )


class ZipSource:
    """The members of an uploaded ZIP, checked from the directory on opening."""

    def __init__(self, fileobj: IO[bytes], limits: ZipLimits) -> None:
        self.limits = limits
        try:
            self._zip = zipfile.ZipFile(fileobj)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise ArchiveRefused(
                "archive-invalid", f"The upload is not a readable ZIP archive ({exc}).", entry=None
            ) from exc
        if len(infos) > limits.max_entries:
            raise ArchiveRefused(
                "archive-too-many-entries",
                f"The archive has {len(infos)} entries; at most {limits.max_entries} are accepted.",
                entry=infos[limits.max_entries].filename,
                status=413,
            )
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.manifest: zipfile.ZipInfo | None = None
        folded: set[str] = set()
        declared = 0
        for info in infos:
            name = info.filename
            check_name(name.rstrip("/") or name)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise ArchiveRefused(
                    "archive-symlink", f"{name}: symbolic links are not accepted.", entry=name
                )
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveRefused(
                    "archive-special-file", f"{name}: only regular files are accepted.", entry=name
                )
            if info.is_dir() or skipped(name):
                continue
            if info.flag_bits & 0x1:
                raise ArchiveRefused(
                    "archive-encrypted", f"{name}: encrypted members are not accepted.", entry=name
                )
            check_file_name(name, manifest_allowed=True)
            if name.casefold() in folded:
                raise ArchiveRefused(
                    "archive-duplicate-name",
                    f"{name}: another member has the same name.",
                    entry=name,
                )
            folded.add(name.casefold())
            self._check_size(info, info.file_size, declared + info.file_size)
            declared += info.file_size
            if name.lower() == MANIFEST_NAME:
                self.manifest = info
            else:
                self.members[name] = info
        self._inflated = 0

    def _check_size(self, info: zipfile.ZipInfo, size: int, total: int) -> None:
        limits = self.limits
        if size > limits.max_member_bytes:
            raise ArchiveRefused(
                "archive-member-too-large",
                f"{info.filename}: larger than {limits.max_member_bytes} bytes unpacked.",
                entry=info.filename,
                status=413,
            )
        if size > RATIO_FLOOR_BYTES and size > limits.max_ratio * max(info.compress_size, 1):
            raise ArchiveRefused(
                "archive-bomb",
                f"{info.filename}: unpacks to more than {limits.max_ratio:g} times its "
                "compressed size.",
                entry=info.filename,
                status=413,
            )
        if total > limits.max_total_bytes:
            raise ArchiveRefused(
                "archive-too-large",
                f"{info.filename}: the archive unpacks to more than {limits.max_total_bytes} "
                "bytes.",
                entry=info.filename,
                status=413,
            )

    def names(self) -> list[str]:
        return list(self.members)

    def read_manifest(self, max_bytes: int) -> bytes | None:
        if self.manifest is None:
            return None
        return self._read(self.manifest, max_bytes)

    def read(self, name: str) -> bytes:
        """The member's bytes, inflated under the limits; refused if not an image."""
        data = self._read(self.members[name], self.limits.max_member_bytes)
        check_content(name, data[:512])
        return data

    def _read(self, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            with self._zip.open(info) as member:
                for chunk in iter(lambda: member.read(CHUNK), b""):
                    size += len(chunk)
                    self._inflated += len(chunk)
                    if size > max_bytes:
                        raise ArchiveRefused(
                            "archive-member-too-large",
                            f"{info.filename}: larger than {max_bytes} bytes unpacked.",
                            entry=info.filename,
                            status=413,
                        )
                    self._check_size(info, size, self._inflated)
                    chunks.append(chunk)
        except ArchiveRefused:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise ArchiveRefused(
                "archive-member-corrupt",
                f"{info.filename}: the member cannot be unpacked ({exc}).",
                entry=info.filename,
            ) from exc
        return b"".join(chunks)
