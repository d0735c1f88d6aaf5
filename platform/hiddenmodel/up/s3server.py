"""The embedded S3 endpoint of ``up``: an S3-compatible server over a folder of files.

It speaks the part of S3's REST API that the platform and everyday tools use, path-style:
buckets (create, head, delete, list), objects (put, get with ranges and ``response-*``
overrides, head, delete, batch delete), object tags, and ListObjectsV2 (and V1) with prefixes,
delimiters and pages. Every request is checked as S3 checks it: SigV4 signatures in the
header or a presigned URL (:mod:`hiddenmodel.up.sigv4`) with ``up``'s access key, and every
body against the digests it came with (``x-amz-content-sha256``, ``Content-MD5``,
``x-amz-checksum-sha256``/``-sha1``/``-crc32``). Anything else (multipart uploads, ACLs,
lifecycle rules, versioning) is refused with S3's ``501 NotImplemented``, which the platform
takes as an endpoint without that feature.

Objects live on disk under ``--root`` (:mod:`hiddenmodel.up.objectstore`), so they survive a
restart of ``up`` along with the jobs that name them. Bodies are streamed to and from their
files (with direct I/O where the file system takes it), connections are kept alive, and
requests are not logged line by line: at several per job they cost more than they tell.

    python -m hiddenmodel.up.s3server --host 127.0.0.1 --port 9000 --root var/s3
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import logging
import re
import signal
import socket
import sys
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, unquote_to_bytes
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from hiddenmodel.up import sigv4
from hiddenmodel.up.objectstore import ObjectInfo, ObjectStore, Readable, StoreError, read_body

log = logging.getLogger("hiddenmodel.s3server")

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_OBJECT_BYTES = 5 * 1024**3  # S3's limit for a single PUT
MAX_XML_BYTES = 2 * 1024**2
MAX_KEY_BYTES = 1024
MAX_TAGS = 10
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Query parameters that are not subresources: SDK markers and GET's response overrides.
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
    "response-content-language": "Content-Language",
    "response-cache-control": "Cache-Control",
    "response-expires": "Expires",
}
OBJECT_PARAMS = {"x-id", *RESPONSE_OVERRIDES}
LIST_PARAMS = {
    "list-type",
    "prefix",
    "delimiter",
    "max-keys",
    "start-after",
    "continuation-token",
    "encoding-type",
    "fetch-owner",
    "marker",
    "x-id",
}


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def _refuse(status: int, code: str, message: str, **extra: str) -> NoReturn:
    raise S3Error(status, code, message, **extra)


class _Crc32:
    """zlib's CRC-32 behind hashlib's interface (``x-amz-checksum-crc32`` is big-endian)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


CHECKSUMS: dict[str, Callable[[], Any]] = {
    "x-amz-checksum-sha1": lambda: hashlib.sha1(usedforsecurity=False),
    "x-amz-checksum-crc32": _Crc32,
}


def _xml(root: str, inner: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NAMESPACE}">{inner}</{root}>'
    ).encode()


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _refuse(400, "InvalidDigest", f"The {name} you specified is not valid.")


def parse_tags(encoded: str) -> dict[str, str]:
    """``x-amz-tagging``'s URL-encoded tags, as S3 limits them."""
    tags: dict[str, str] = {}
    for part in encoded.split("&") if encoded else []:
        name, _, value = part.partition("=")
        try:
            key = unquote_to_bytes(name.replace("+", " ")).decode()
            tags[key] = unquote_to_bytes(value.replace("+", " ")).decode()
        except UnicodeDecodeError:
            _refuse(400, "InvalidTag", "Tags must be UTF-8.")
    _check_tags(tags)
    return tags


def _check_tags(tags: dict[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        _refuse(400, "BadRequest", "Object tags cannot be greater than 10")
    for key, value in tags.items():
        if not 0 < len(key) <= 128 or len(value) > 256:
            _refuse(400, "InvalidTag", "A tag's key must be 1-128 characters, its value 0-256.")


def _tag_set(tags: dict[str, str]) -> str:
    return (
        "<TagSet>"
        + "".join(
            f"<Tag><Key>{escape(k)}</Key><Value>{escape(v)}</Value></Tag>" for k, v in tags.items()
        )
        + "</TagSet>"
    )


def _parse_xml(body: bytes) -> ElementTree.Element:
    """S3's request documents are UTF-8; the text is checked for a DTD once decoded, so no
    other encoding can hide one."""
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        _refuse(400, "MalformedXML", "The XML you provided is not UTF-8.")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        _refuse(400, "MalformedXML", "Document type declarations are not accepted.")
    if re.match(r"\s*<\?xml[^>]*encoding=[\"'](?!utf-?8[\"'])", text, re.IGNORECASE):
        _refuse(400, "MalformedXML", "The XML you provided is not UTF-8.")
    try:
        # Without a DTD there are no entities to expand, and expat fetches nothing.
        return ElementTree.fromstring(text)  # noqa: S314
    except ElementTree.ParseError:
        _refuse(400, "MalformedXML", "The XML you provided was not well-formed.")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str | None:
    found = _children(element, name)
    return (found[0].text or "") if found else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hiddenmodel-s3"
    sys_version = ""
    timeout = 120  # an idle kept-alive connection is closed after this
    server: S3Server

    # --- plumbing ------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: no Nagle delay between them.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_error(self, format: str, *args: Any) -> None:
        log.warning(format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self.request_id = uuid.uuid4().hex[:16].upper()
        # A request without a body leaves nothing unread: its connection carries on after
        # an error too (a HEAD of a missing object is no reason to reconnect).
        self.body_read = self.headers.get("Content-Length", "0") == "0" and (
            "Transfer-Encoding" not in self.headers
        )
        self.resource = ""
        try:
            try:
                self._check_framing()
                self._route(method)
                if not self.body_read:
                    # Answered without reading the body it came with: never parse that body
                    # as the next request.
                    self.close_connection = True
            except StoreError as exc:
                raise S3Error(exc.status, exc.code, exc.message) from exc
            except sigv4.AuthError as exc:
                raise S3Error(403, exc.code, exc.message) from exc
        except S3Error as exc:
            self._error(method, exc)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", method, self.path)
            self._error(method, S3Error(500, "InternalError", "We encountered an internal error."))

    def _check_framing(self) -> None:
        """One way to tell where the body ends, or the request is refused (and the
        connection closed): two lengths, or a length and chunks, are how requests are
        smuggled past a proxy."""
        lengths = self.headers.get_all("Content-Length") or []
        chunked = self.headers.get_all("Transfer-Encoding") or []
        if len(lengths) > 1 or (lengths and chunked) or len(chunked) > 1:
            self.body_read = False
            _refuse(400, "InvalidRequest", "The request's length is given more than once.")
        if lengths and not re.fullmatch(r"[0-9]{1,19}", lengths[0]):
            self.body_read = False
            _refuse(400, "InvalidArgument", "Content-Length must be a number.")

    def _error(self, method: str, exc: S3Error) -> None:
        # Whatever headers a failed answer had started are dropped.
        self._headers_buffer: list[bytes] = []
        if not self.body_read:
            # The body was not read: the connection cannot carry another request.
            self.close_connection = True
        extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in exc.extra.items())
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{exc.code}</Code><Message>{escape(exc.message)}</Message>"
            f"<Resource>{escape(self.resource)}</Resource>{extra}"
            f"<RequestId>{self.request_id}</RequestId></Error>"
        ).encode()
        try:
            self._send(exc.status, {"Content-Type": "application/xml"}, body, head=method == "HEAD")
        except OSError:  # the client has gone
            self.close_connection = True

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes = b"",
        *,
        head: bool = False,
        length: int | None = None,
    ) -> None:
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        self.send_header("x-amz-request-id", self.request_id)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _read_small_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            _refuse(411, "MissingContentLength", "You must provide the Content-Length header.")
        length = self._content_length(required=False)
        if length > MAX_XML_BYTES:
            _refuse(400, "MaxMessageLengthExceeded", "Your request was too big.")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            _refuse(400, "IncompleteBody", "The request body ended early.")
        self.body_read = True
        return body

    def _content_length(self, *, required: bool) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            if required:
                _refuse(411, "MissingContentLength", "You must provide the Content-Length header.")
            return 0
        return int(value)  # checked by _check_framing

    # --- routing -------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        if not raw_path.startswith("/"):
            _refuse(400, "InvalidURI", "Couldn't parse the specified URI.")
        headers = {name.lower(): value for name, value in self.headers.items()}
        verified = sigv4.verify(method, raw_path, raw_query, headers, self.server.credentials)
        if self.server.region is not None and verified.region != self.server.region:
            _refuse(
                400,
                "AuthorizationHeaderMalformed",
                f"The authorization header is malformed; the region '{verified.region}' is "
                f"wrong; expecting '{self.server.region}'",
                Region=self.server.region,
            )
        query = dict(sigv4.query_pairs(raw_query))
        try:
            path = unquote_to_bytes(raw_path).decode()
        except UnicodeDecodeError:
            _refuse(400, "InvalidURI", "The key must be UTF-8.")
        bucket, _, key = path[1:].partition("/")
        self.resource = path
        if not bucket:
            if method != "GET":
                _refuse(405, "MethodNotAllowed", "The method is not allowed on the service.")
            self._list_buckets()
            return
        if not BUCKET_NAME.match(bucket):
            _refuse(400, "InvalidBucketName", "The specified bucket is not valid.")
        if verified.presigned and method not in ("GET", "HEAD"):
            _refuse(403, "AccessDenied", "Presigned URLs here are for downloads only.")
        if key:
            if len(key.encode()) > MAX_KEY_BYTES:
                _refuse(400, "KeyTooLongError", "Your key is too long")
            self._object(method, bucket, key, query, headers, verified)
        else:
            self._bucket(method, bucket, query, headers)

    def _unsupported(self, query: dict[str, str], allowed: set[str]) -> None:
        extra = sorted(
            name for name in query if name not in allowed and not name.startswith("X-Amz-")
        )
        if extra:
            _refuse(
                501,
                "NotImplemented",
                f"This S3 endpoint does not implement '{extra[0]}'.",
            )

    # --- the service and buckets -----------------------------------------------------------

    def _list_buckets(self) -> None:
        inner = "".join(
            f"<Bucket><Name>{name}</Name><CreationDate>{_iso(created)}</CreationDate></Bucket>"
            for name, created in self.server.store.buckets()
        )
        owner = "<Owner><ID>hiddenmodel</ID><DisplayName>hiddenmodel</DisplayName></Owner>"
        body = _xml("ListAllMyBucketsResult", f"{owner}<Buckets>{inner}</Buckets>")
        self._send(200, {"Content-Type": "application/xml"}, body)

    def _bucket(
        self, method: str, bucket: str, query: dict[str, str], headers: dict[str, str]
    ) -> None:
        store = self.server.store
        self._unsupported(query, LIST_PARAMS | {"delete"})
        if method == "POST" and "delete" in query:
            self._delete_objects(bucket, headers)
        elif method == "GET":
            self._list_objects(bucket, query)
        elif method == "HEAD":
            store.require_bucket(bucket)
            self._send(200, {"x-amz-bucket-region": self.server.region or "us-east-1"})
        elif method == "PUT":
            body = self._read_small_body()
            if body.strip():
                _parse_xml(body)  # CreateBucketConfiguration: the region is this server's
            store.create_bucket(bucket)
            self._send(200, {"Location": f"/{bucket}"})
        elif method == "DELETE":
            store.delete_bucket(bucket)
            self._send(204, {})
        else:
            _refuse(405, "MethodNotAllowed", "The method is not allowed on a bucket.")

    def _list_objects(self, bucket: str, query: dict[str, str]) -> None:
        v2 = query.get("list-type") == "2"
        if "list-type" in query and not v2:
            _refuse(400, "InvalidArgument", "list-type must be 2.")
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        try:
            max_keys = int(query.get("max-keys", "1000"))
        except ValueError:
            _refuse(400, "InvalidArgument", "max-keys must be a number.")
        if max_keys < 0:
            _refuse(400, "InvalidArgument", "max-keys must not be negative.")
        max_keys = min(max_keys, 1000)
        if v2:
            token = query.get("continuation-token")
            if token is not None:
                try:
                    after = base64.urlsafe_b64decode(token.encode()).decode()
                except (binascii.Error, ValueError):
                    _refuse(400, "InvalidArgument", "The continuation token is not valid.")
            else:
                after = query.get("start-after", "")
        else:
            after = query.get("marker", "")
        url = query.get("encoding-type") == "url"
        if "encoding-type" in query and not url:
            _refuse(400, "InvalidArgument", "encoding-type must be url.")

        def enc(value: str) -> str:
            return escape(quote(value, safe="/") if url else value)

        if max_keys:
            objects, prefixes, truncated, last = self.server.store.list(
                bucket, prefix=prefix, after=after, limit=max_keys, delimiter=delimiter
            )
        else:
            self.server.store.require_bucket(bucket)
            objects, prefixes, truncated, last = [], [], False, ""
        contents = "".join(
            f"<Contents><Key>{enc(o.key)}</Key><LastModified>{_iso(o.modified)}</LastModified>"
            f'<ETag>"{o.etag}"</ETag><Size>{o.size}</Size>'
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for o in objects
        )
        common = "".join(
            f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>" for p in prefixes
        )
        parts = [f"<Name>{bucket}</Name><Prefix>{enc(prefix)}</Prefix>"]
        if delimiter:
            parts.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        parts.append(f"<MaxKeys>{max_keys}</MaxKeys>")
        if url:
            parts.append("<EncodingType>url</EncodingType>")
        parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if v2:
            parts.append(f"<KeyCount>{len(objects) + len(prefixes)}</KeyCount>")
            if "continuation-token" in query:
                token = escape(query["continuation-token"])
                parts.append(f"<ContinuationToken>{token}</ContinuationToken>")
            if "start-after" in query:
                parts.append(f"<StartAfter>{enc(query['start-after'])}</StartAfter>")
            if truncated:
                next_token = base64.urlsafe_b64encode(last.encode()).decode()
                parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        else:
            parts.append(f"<Marker>{enc(after)}</Marker>")
            if truncated and delimiter:
                parts.append(f"<NextMarker>{enc(last)}</NextMarker>")
        body = _xml("ListBucketResult", "".join(parts) + contents + common)
        self._send(200, {"Content-Type": "application/xml"}, body)

    def _delete_objects(self, bucket: str, headers: dict[str, str]) -> None:
        body = self._read_small_body()
        digests = self._expected_digests(headers)
        if not digests:
            _refuse(
                400,
                "InvalidRequest",
                "Missing required header for this request: Content-MD5 or x-amz-checksum-*.",
            )
        hashers = {name: factory() for name, (factory, _) in digests.items()}
        for hasher in hashers.values():
            hasher.update(body)
        self._check_digests(digests, hashers)
        root = _parse_xml(body)
        quiet = (_text(root, "Quiet") or "").strip().lower() == "true"
        keys = [_text(o, "Key") or "" for o in _children(root, "Object")]
        if not keys or len(keys) > 1000:
            _refuse(400, "MalformedXML", "A delete names 1 to 1000 objects.")
        self.server.store.require_bucket(bucket)
        deleted, errors = [], []
        for key in keys:
            if not key or len(key.encode()) > MAX_KEY_BYTES:
                errors.append(
                    f"<Error><Key>{escape(key)}</Key><Code>InvalidArgument</Code>"
                    "<Message>The key is not valid.</Message></Error>"
                )
                continue
            self.server.store.delete(bucket, key)
            if not quiet:
                deleted.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        result = _xml("DeleteResult", "".join(deleted) + "".join(errors))
        self._send(200, {"Content-Type": "application/xml"}, result)

    # --- objects ---------------------------------------------------------------------------

    def _object(
        self,
        method: str,
        bucket: str,
        key: str,
        query: dict[str, str],
        headers: dict[str, str],
        verified: sigv4.Verified,
    ) -> None:
        self._unsupported(query, OBJECT_PARAMS | {"tagging"})
        if "tagging" in query:
            self._tagging(method, bucket, key)
        elif method in ("GET", "HEAD"):
            self._get(bucket, key, query, headers, head=method == "HEAD")
        elif method == "PUT":
            if "x-amz-copy-source" in headers:
                _refuse(501, "NotImplemented", "This S3 endpoint does not implement copies.")
            self._put(bucket, key, headers, verified)
        elif method == "DELETE":
            self.server.store.delete(bucket, key)
            self._send(204, {})
        else:
            _refuse(405, "MethodNotAllowed", "The method is not allowed on an object.")

    def _expected_digests(
        self, headers: dict[str, str]
    ) -> dict[str, tuple[Callable[[], Any], bytes]]:
        """The digests the body must have: header name -> (hasher factory, digest)."""
        expected: dict[str, tuple[Callable[[], Any], bytes]] = {}
        if "content-md5" in headers:
            expected["content-md5"] = (
                lambda: hashlib.md5(usedforsecurity=False),
                _b64(headers["content-md5"], "Content-MD5"),
            )
        for name, value in headers.items():
            if not name.startswith("x-amz-checksum-") or name == "x-amz-checksum-type":
                continue
            if name == "x-amz-checksum-sha256":
                expected[name] = (hashlib.sha256, _b64(value, name))
            elif name in CHECKSUMS:
                expected[name] = (CHECKSUMS[name], _b64(value, name))
            elif name != "x-amz-checksum-mode":
                _refuse(400, "InvalidRequest", f"This S3 endpoint does not check {name}.")
        return expected

    def _check_digests(
        self, expected: dict[str, tuple[Callable[[], Any], bytes]], hashers: dict[str, Any]
    ) -> None:
        for name, (_, digest) in expected.items():
            if hashers[name].digest() != digest:
                if name == "content-md5":
                    _refuse(
                        400,
                        "BadDigest",
                        "The Content-MD5 you specified did not match what we received.",
                    )
                _refuse(
                    400,
                    "BadDigest",
                    f"The {name[len('x-amz-checksum-') :].upper()} you specified did not match "
                    "the calculated checksum.",
                )

    def _put(
        self, bucket: str, key: str, headers: dict[str, str], verified: sigv4.Verified
    ) -> None:
        payload = verified.payload_hash
        if payload.startswith("STREAMING-"):
            _refuse(501, "NotImplemented", "This S3 endpoint does not take aws-chunked bodies.")
        if payload != sigv4.UNSIGNED_PAYLOAD and not HEX_SHA256.match(payload):
            _refuse(400, "InvalidArgument", "x-amz-content-sha256 must be a hex SHA-256.")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            _refuse(411, "MissingContentLength", "You must provide the Content-Length header.")
        length = self._content_length(required=True)
        if length > MAX_OBJECT_BYTES:
            _refuse(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        tags = parse_tags(headers.get("x-amz-tagging", ""))
        metadata = {
            name[len("x-amz-meta-") :]: value
            for name, value in headers.items()
            if name.startswith("x-amz-meta-")
        }
        if sum(len(k) + len(v) for k, v in metadata.items()) > 2048:
            _refuse(400, "MetadataTooLarge", "Your metadata headers exceed the maximum size.")
        expected = self._expected_digests(headers)
        sha256 = expected.pop("x-amz-checksum-sha256", None)
        md5 = expected.pop("content-md5", None)
        hashers = {name: factory() for name, (factory, _) in expected.items()}
        written = self.server.store.write_body(
            _Tee(self.rfile, list(hashers.values())), length, want_md5=md5 is not None
        )
        self.body_read = True
        try:
            if payload != sigv4.UNSIGNED_PAYLOAD and written.sha256.hex() != payload:
                _refuse(
                    400,
                    "XAmzContentSHA256Mismatch",
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                )
            if sha256 is not None and written.sha256 != sha256[1]:
                _refuse(
                    400,
                    "BadDigest",
                    "The SHA256 you specified did not match the calculated checksum.",
                )
            if md5 is not None and written.md5 != md5[1]:
                _refuse(
                    400,
                    "BadDigest",
                    "The Content-MD5 you specified did not match what we received.",
                )
            self._check_digests(expected, hashers)
        except S3Error:
            self.server.store.discard(written)
            raise
        info = self.server.store.commit_object(
            bucket,
            key,
            written,
            content_type=headers.get("content-type", "binary/octet-stream"),
            metadata=metadata,
            tags=tags,
        )
        response = {"ETag": f'"{info.etag}"'}
        if sha256 is not None:
            response["x-amz-checksum-sha256"] = base64.b64encode(info.sha256).decode()
        self._send(200, response)

    def _object_headers(self, info: ObjectInfo, headers: dict[str, str]) -> dict[str, str]:
        out = {
            "Content-Type": info.content_type,
            "ETag": f'"{info.etag}"',
            "Last-Modified": format_datetime(info.modified.replace(microsecond=0), usegmt=True),
            "Accept-Ranges": "bytes",
        }
        if info.tags:
            out["x-amz-tagging-count"] = str(len(info.tags))
        for name, value in info.metadata.items():
            out[f"x-amz-meta-{name}"] = value
        if headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            out["x-amz-checksum-sha256"] = base64.b64encode(info.sha256).decode()
        return out

    def _get(
        self,
        bucket: str,
        key: str,
        query: dict[str, str],
        headers: dict[str, str],
        *,
        head: bool,
    ) -> None:
        info, body = self.server.store.open(bucket, key)
        with body:
            out = self._object_headers(info, headers)
            for param, header in RESPONSE_OVERRIDES.items():
                if param in query:
                    out[header] = _header_value(param, query[param])
            start, end = 0, info.size
            status = 200
            ranged = headers.get("range")
            if ranged is not None:
                parsed = _parse_range(ranged, info.size)
                if parsed is not None:
                    start, end = parsed
                    status = 206
                    out["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
                    # The checksum is the whole object's: a part does not carry it.
                    out.pop("x-amz-checksum-sha256", None)
            self._send(status, out, head=head, length=end - start)
            if not head and end > start:
                for part in read_body(body, start, end):
                    self.connection.sendall(part)

    def _tagging(self, method: str, bucket: str, key: str) -> None:
        store = self.server.store
        if method == "GET":
            info = store.head(bucket, key)
            body = _xml("Tagging", _tag_set(info.tags))
            self._send(200, {"Content-Type": "application/xml"}, body)
        elif method == "PUT":
            root = _parse_xml(self._read_small_body())
            tags: dict[str, str] = {}
            for tag_set in _children(root, "TagSet"):
                for tag in _children(tag_set, "Tag"):
                    tags[_text(tag, "Key") or ""] = _text(tag, "Value") or ""
            _check_tags(tags)
            store.set_tags(bucket, key, tags)
            self._send(200, {})
        elif method == "DELETE":
            store.set_tags(bucket, key, {})
            self._send(204, {})
        else:
            _refuse(405, "MethodNotAllowed", "The method is not allowed on tags.")


def _header_value(name: str, value: str) -> str:
    """A ``response-*`` override as a header value: no line breaks or other control
    characters (they would end the header or the response), nothing latin-1 cannot carry."""
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        _refuse(400, "InvalidArgument", f"{name} holds a control character.")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        _refuse(
            400,
            "InvalidArgument",
            f"{name} must be ISO-8859-1; send other characters encoded (RFC 6266 filename*).",
        )
    return value


class _Tee:
    """A reader that feeds what it reads to extra hashers."""

    def __init__(self, source: Readable, hashers: list[Any]) -> None:
        self.source = source
        self.hashers = hashers

    def readinto(self, buffer: memoryview, /) -> int | None:
        n = self.source.readinto(buffer)
        if n:
            for hasher in self.hashers:
                hasher.update(buffer[:n])
        return n


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as [start, end); None (the whole object) for forms S3 ignores."""
    match = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)-([0-9]*)\s*", value)
    if match is None or match.group(1) + match.group(2) == "":
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        if last and int(last) < start:
            return None  # a backwards range is ignored (RFC 9110): the whole object
        end = min(int(last) + 1, size) if last else size
    else:
        start, end = max(size - int(last), 0), size
        if int(last) == 0:
            raise S3Error(416, "InvalidRange", "The requested range is not satisfiable")
    if start >= size:
        raise S3Error(416, "InvalidRange", "The requested range is not satisfiable")
    return start, end


class S3Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        store: ObjectStore,
        credentials: sigv4.Credentials,
        region: str | None,
    ) -> None:
        self.store = store
        self.credentials = credentials
        self.region = region
        super().__init__(address, Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True, help="the folder objects live in")
    args = parser.parse_args(argv)

    from hiddenmodel.memory import tune_malloc
    from hiddenmodel.settings import get_settings

    tune_malloc()  # bodies pass through megabyte buffers
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    settings = get_settings()
    try:
        store = ObjectStore(args.root)
    except StoreError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    server = S3Server(
        (args.host, args.port),
        store,
        sigv4.Credentials(
            settings.s3_access_key_id, settings.s3_secret_access_key.get_secret_value()
        ),
        settings.s3_region,
    )
    log.info("S3 on %s:%s, objects under %s", args.host, server.server_port, args.root)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # out of serve_forever, so the index is closed cleanly

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
