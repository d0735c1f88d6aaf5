"""S3 storage: deterministic tenant-prefixed keys, tenant tags on every object."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import boto3
import urllib3
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.config import Config
from botocore.exceptions import ClientError

from hiddenmodel.settings import get_settings


def object_key(org_id: uuid.UUID, job_id: uuid.UUID, name: str, ext: str) -> str:
    """``orgs/{org}/jobs/{job}/{name}.{ext}``: a retry writes the same key again."""
    return f"orgs/{org_id}/jobs/{job_id}/{name}.{ext}"


def org_prefix(org_id: uuid.UUID) -> str:
    return f"orgs/{org_id}/"


@lru_cache
def s3_client() -> Any:
    return _new_client()


def _new_client() -> Any:
    settings = get_settings()
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value(),
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=3,
            read_timeout=30,
            signature_version="s3v4",
            # Integrity is the platform's own SHA-256 (see put_object): botocore's default
            # CRC32 of every body and its signed payload hash would hash each object twice
            # more. Nor does botocore check what it reads: a worker compares an input with
            # the digest its job recorded, and walks and validates one that differs as it
            # would a new upload (images.decode_image).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"payload_signing_enabled": False},
        ),
    )


def ensure_bucket() -> None:
    client = s3_client()
    bucket = get_settings().s3_bucket
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def put_object(
    key: str,
    data: bytes,
    content_type: str,
    *,
    org_id: uuid.UUID,
    job_id: uuid.UUID,
    kind: str,
    sha256: bytes | None = None,
) -> None:
    """Store ``data`` under ``key``, tagged with its tenant, job and kind.

    The body's SHA-256 (``sha256`` when the caller has it already, as the submit does)
    travels as ``x-amz-checksum-sha256``, a signed header: S3 refuses a body that does not
    match it. That is the whole integrity check, so the body is hashed once, not also for
    the signature's payload hash and botocore's CRC32.
    """
    digest = sha256 if sha256 is not None else hashlib.sha256(data).digest()
    checksum = base64.b64encode(digest).decode("ascii")
    tagging = urlencode({"tenant": str(org_id), "job": str(job_id), "kind": kind})
    direct = _direct_client()
    if direct is not None:
        direct.put(key, data, content_type=content_type, checksum=checksum, tagging=tagging)
        return
    s3_client().put_object(
        Bucket=get_settings().s3_bucket,
        Key=key,
        Body=data,
        ContentType=content_type,
        ChecksumSHA256=checksum,
        Tagging=tagging,
    )


def get_object(key: str) -> bytes:
    direct = _direct_client()
    if direct is not None:
        return direct.get(key)
    response = s3_client().get_object(Bucket=get_settings().s3_bucket, Key=key)
    body: bytes = response["Body"].read()
    return body


def iter_object(key: str, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    """The object's bytes in chunks, read from S3 as they are consumed."""
    response = s3_client().get_object(Bucket=get_settings().s3_bucket, Key=key)
    body = response["Body"]
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


def is_missing(exc: BaseException) -> bool:
    """Whether S3 answered that the object (or its bucket) does not exist."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def object_exists(key: str) -> bool:
    """Whether ``key`` is stored: an output can outlive its object (a development S3 that
    kept nothing across a restart, a bucket emptied by hand)."""
    try:
        s3_client().head_object(Bucket=get_settings().s3_bucket, Key=key)
    except Exception as exc:
        if is_missing(exc):
            return False
        raise
    return True


def delete_objects(keys: list[str]) -> set[str]:
    """Delete ``keys`` (missing ones count as deleted); returns the keys S3 refused."""
    refused: set[str] = set()
    for start in range(0, len(keys), 1000):  # S3 takes at most 1000 keys a request
        response = s3_client().delete_objects(
            Bucket=get_settings().s3_bucket,
            Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
        )
        refused |= {e["Key"] for e in response.get("Errors", []) if "Key" in e}
    return refused


def object_tags(key: str) -> dict[str, str]:
    response = s3_client().get_object_tagging(Bucket=get_settings().s3_bucket, Key=key)
    return {t["Key"]: t["Value"] for t in response["TagSet"]}


def list_keys(prefix: str) -> list[str]:
    client = s3_client()
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=get_settings().s3_bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@dataclass(frozen=True)
class ListedPage:
    """One page of a listing: (key, last modified) pairs, in key order."""

    objects: list[tuple[str, datetime]]
    truncated: bool


def list_page(prefix: str, *, start_after: str | None, max_keys: int) -> ListedPage:
    """Up to ``max_keys`` objects under ``prefix`` that sort after ``start_after``."""
    params: dict[str, Any] = {
        "Bucket": get_settings().s3_bucket,
        "Prefix": prefix,
        "MaxKeys": max_keys,
    }
    if start_after:
        params["StartAfter"] = start_after
    response = s3_client().list_objects_v2(**params)
    objects = [(o["Key"], o["LastModified"]) for o in response.get("Contents", [])]
    return ListedPage(objects=objects, truncated=bool(response.get("IsTruncated")))


def presigned_get_url(key: str, org_id: uuid.UUID, *, filename: str | None = None) -> str:
    """A short-lived download URL. Callers reach here only after an RLS-scoped read of the
    job; the org check is a second lock on the same door."""
    if not key.startswith(org_prefix(org_id)):
        raise PermissionError("object does not belong to the organization")
    settings = get_settings()
    disposition = f'attachment; filename="{filename}"' if filename else None
    signer = _presigner(
        s3_client(),
        settings.s3_bucket,
        settings.s3_access_key_id,
        settings.s3_secret_access_key.get_secret_value(),
    )
    if signer is not None:
        return signer.url(key, disposition, settings.presigned_url_ttl_seconds)
    params: dict[str, str] = {"Bucket": settings.s3_bucket, "Key": key}
    if disposition:
        params["ResponseContentDisposition"] = disposition
    url: str = s3_client().generate_presigned_url(
        "get_object", Params=params, ExpiresIn=settings.presigned_url_ttl_seconds
    )
    return url


# --- presigned GETs without botocore's per-call request pipeline ----------------------------

_PROBE_KEY = "orgs/presign-probe/a b~c.png"
_PROBE_DISPOSITION = 'attachment; filename="probe; ~x.png"'


def _encode(value: str, safe: str = "-_.~") -> str:
    return quote(value, safe=safe)


@dataclass(frozen=True)
class Presigner:
    """SigV4 query-string signing of ``GET`` for one bucket's objects: the URL botocore's
    ``generate_presigned_url("get_object", …)`` returns, byte for byte, at a tenth of its
    cost (a listing signs one URL per output). Where the bucket's URLs start (path-style or
    virtual-hosted) is taken from one URL botocore signs, and :func:`_presigner` keeps it only
    if it signs that same URL identically; otherwise botocore signs every URL itself."""

    base: str  # scheme://host[:port]/ and, path-style, the bucket and a slash
    host: str
    path_prefix: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def url(
        self, key: str, disposition: str | None, expires: int, at: datetime | None = None
    ) -> str:
        at = at or datetime.now(UTC)
        amz_date = at.strftime("%Y%m%dT%H%M%SZ")
        scope = self.scope(amz_date[:8])
        path = _encode(key, safe="/~")
        query: list[tuple[str, str]] = []
        if disposition is not None:
            query.append(("response-content-disposition", disposition))
        query += [
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            ("X-Amz-Credential", f"{self.access_key}/{scope}"),
            ("X-Amz-Date", amz_date),
            ("X-Amz-Expires", str(expires)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        encoded = [(_encode(k), _encode(v)) for k, v in query]
        canonical_query = "&".join(f"{k}={v}" for k, v in sorted(encoded))
        canonical = (
            f"GET\n{self.path_prefix}{path}\n{canonical_query}\nhost:{self.host}\n\nhost\n"
            "UNSIGNED-PAYLOAD"
        )
        query_string = "&".join(f"{k}={v}" for k, v in encoded)
        return f"{self.base}{path}?{query_string}&X-Amz-Signature={self.sign(amz_date, canonical)}"

    def scope(self, day: str) -> str:
        return f"{day}/{self.region}/s3/aws4_request"

    def sign(self, amz_date: str, canonical: str) -> str:
        """The signature of a canonical request made at ``amz_date`` (``%Y%m%dT%H%M%SZ``)."""
        day = amz_date[:8]
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{self.scope(day)}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        key = _signing_key(self.secret_key, day, self.region)
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@lru_cache(maxsize=4)
def _signing_key(secret_key: str, day: str, region: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@lru_cache(maxsize=8)
def _presigner(client: Any, bucket: str, access_key: str, secret_key: str) -> Presigner | None:
    """The fast signer for ``client``'s bucket with the keys :func:`s3_client` gave it, once it
    has signed botocore's own probe URL identically (so a configuration it does not reproduce
    keeps botocore's signing)."""
    probe: str = client.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": bucket,
            "Key": _PROBE_KEY,
            "ResponseContentDisposition": _PROBE_DISPOSITION,
        },
        ExpiresIn=60,
    )
    parts = urlsplit(probe)
    signed_path = _encode(_PROBE_KEY, safe="/~")
    if not parts.path.endswith(signed_path):
        return None
    path_prefix = parts.path[: -len(signed_path)]
    amz_date = parse_qs(parts.query).get("X-Amz-Date", [""])[0]
    try:
        at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    signer = Presigner(
        base=f"{parts.scheme}://{parts.netloc}{path_prefix}",
        host=parts.netloc,
        path_prefix=path_prefix,
        access_key=access_key,
        secret_key=secret_key,
        region=client.meta.region_name,
    )
    return signer if signer.url(_PROBE_KEY, _PROBE_DISPOSITION, 60, at) == probe else None


# --- whole-object GETs and PUTs without botocore's per-call request pipeline -----------------

# What botocore's client is configured with (s3_client): the same timeouts, and retries of
# the same failures (connection errors, throttling and 5xx answers), three attempts in all.
_DIRECT_TIMEOUT = urllib3.Timeout(connect=3, read=30)
_DIRECT_RETRY = urllib3.Retry(
    total=2,
    backoff_factor=0.05,
    status_forcelist=(429, 500, 502, 503, 504),
    allowed_methods=frozenset({"GET", "PUT"}),
    raise_on_status=False,
)
_ERROR_CODE = re.compile(r"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_PROBE_PUT_KEY = "orgs/direct-probe/a b~c.png"
_PROBE_PUT = {
    "content_type": "image/png",
    "checksum": base64.b64encode(hashlib.sha256(b"probe").digest()).decode("ascii"),
    "tagging": urlencode({"tenant": "t", "job": "j~1", "kind": "output"}),
}


@dataclass(frozen=True)
class DirectS3:
    """``GET`` and ``PUT`` of whole objects, signed with SigV4 in the ``Authorization``
    header as botocore signs them (``UNSIGNED-PAYLOAD``; the body's integrity is the
    ``x-amz-checksum-sha256`` S3 checks), sent over one urllib3 pool.

    botocore's request pipeline (its events, endpoint rules, header and timestamp parsing)
    costs about 0.6 ms of CPU a call, more than the call itself; a job makes three (the
    submit's put of its input, the worker's get of it and put of its output). The
    addressing and the keys are the :class:`Presigner`'s, itself checked against botocore,
    and :func:`_direct_client` keeps this signer only if it signs botocore's own probe
    request identically. S3's refusals are raised as botocore's ``ClientError``, with the
    code and message S3 gave, so callers tell a missing object from other failures as before.
    """

    signer: Presigner
    pool: urllib3.PoolManager = field(compare=False, repr=False)

    def signed_headers(
        self, method: str, key: str, headers: dict[str, str], at: datetime | None = None
    ) -> dict[str, str]:
        """``headers`` (lower-case names) with the date, payload and signature headers."""
        at = at or datetime.now(UTC)
        amz_date = at.strftime("%Y%m%dT%H%M%SZ")
        signer = self.signer
        all_headers = {
            **headers,
            "host": signer.host,
            "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
            "x-amz-date": amz_date,
        }
        names = sorted(all_headers)
        canonical = "\n".join(
            [
                method,
                signer.path_prefix + _encode(key, safe="/~"),
                "",
                "".join(f"{n}:{' '.join(all_headers[n].split())}\n" for n in names),
                ";".join(names),
                "UNSIGNED-PAYLOAD",
            ]
        )
        all_headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={signer.access_key}/{signer.scope(amz_date[:8])}, "
            f"SignedHeaders={';'.join(names)}, Signature={signer.sign(amz_date, canonical)}"
        )
        return all_headers

    @staticmethod
    def put_headers(*, content_type: str, checksum: str, tagging: str) -> dict[str, str]:
        """The headers of a put besides those :meth:`signed_headers` adds (all signed)."""
        return {
            "content-type": content_type,
            "x-amz-checksum-sha256": checksum,
            "x-amz-tagging": tagging,
        }

    def put(self, key: str, data: bytes, *, content_type: str, checksum: str, tagging: str) -> None:
        headers = self.put_headers(content_type=content_type, checksum=checksum, tagging=tagging)
        self._send("PUT", "PutObject", key, headers, data)

    def get(self, key: str) -> bytes:
        return self._send("GET", "GetObject", key, {}, None)

    def _send(
        self, method: str, operation: str, key: str, headers: dict[str, str], body: bytes | None
    ) -> bytes:
        url = self.signer.base + _encode(key, safe="/~")
        response = self.pool.request(
            method,
            url,
            body=body,
            headers=self.signed_headers(method, key, headers),
            timeout=_DIRECT_TIMEOUT,
            retries=_DIRECT_RETRY,
            redirect=False,
            preload_content=True,
        )
        if response.status != 200:
            raise _client_error(response.status, response.data, operation)
        return response.data


def _client_error(status: int, body: bytes, operation: str) -> ClientError:
    """S3's error answer as botocore raises it (``Error.Code``, ``Error.Message``)."""
    # Read, not parsed: an error document's two leaf elements (no DTD or entities to expand).
    text = body[:65536].decode("utf-8", "replace")
    code_match, message_match = _ERROR_CODE.search(text), _ERROR_MESSAGE.search(text)
    code = html.unescape(code_match.group(1)).strip() if code_match else str(status)
    message = html.unescape(message_match.group(1)).strip() if message_match else ""
    error: Any = {  # botocore-stubs types it as a TypedDict
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(error, operation)


@lru_cache(maxsize=8)
def _direct(signer: Presigner) -> DirectS3 | None:
    """The direct client for ``signer``'s bucket, once it signs the request botocore sends
    for a probe ``put_object`` identically; None keeps botocore for every call. The probe is
    made by a client of its own, configured as :func:`s3_client`'s, and stopped before it is
    sent: nothing reaches S3, and no other caller's request can be taken for it."""
    with _probe_lock:
        return _probe_direct(_new_client(), signer)


_probe_lock = threading.Lock()


def _probe_direct(client: Any, signer: Presigner) -> DirectS3 | None:
    captured: list[Any] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        captured.append(request)
        return AWSResponse(request.url, 200, HTTPHeaders(), _EmptyBody())

    event = "before-send.s3.PutObject"
    client.meta.events.register_first(event, capture)
    try:
        client.put_object(
            Bucket=get_settings().s3_bucket,
            Key=_PROBE_PUT_KEY,
            Body=b"probe",
            ContentType=_PROBE_PUT["content_type"],
            ChecksumSHA256=_PROBE_PUT["checksum"],
            Tagging=_PROBE_PUT["tagging"],
        )
    finally:
        client.meta.events.unregister(event, capture)
    if len(captured) != 1:
        return None
    sent = captured[0]
    sent_headers = {
        k.lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in sent.headers.items()
    }
    amz_date = sent_headers.get("x-amz-date", "")
    try:
        at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    direct = DirectS3(signer, urllib3.PoolManager(maxsize=32, block=False))
    ours = direct.signed_headers("PUT", _PROBE_PUT_KEY, DirectS3.put_headers(**_PROBE_PUT), at)
    url = signer.base + _encode(_PROBE_PUT_KEY, safe="/~")
    if sent.url != url or sent_headers.get("authorization") != ours["authorization"]:
        return None
    return direct


class _EmptyBody:
    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def _direct_client() -> DirectS3 | None:
    settings = get_settings()
    signer = _presigner(
        s3_client(),
        settings.s3_bucket,
        settings.s3_access_key_id,
        settings.s3_secret_access_key.get_secret_value(),
    )
    return None if signer is None else _direct(signer)
