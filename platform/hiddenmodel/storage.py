"""S3 storage: deterministic tenant-prefixed keys, tenant tags on every object."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import boto3
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
    s3_client().put_object(
        Bucket=get_settings().s3_bucket,
        Key=key,
        Body=data,
        ContentType=content_type,
        ChecksumSHA256=base64.b64encode(digest).decode("ascii"),
        Tagging=urlencode({"tenant": str(org_id), "job": str(job_id), "kind": kind}),
    )


def get_object(key: str) -> bytes:
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
        day = amz_date[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
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
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(
            _signing_key(self.secret_key, day, self.region), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        query_string = "&".join(f"{k}={v}" for k, v in encoded)
        return f"{self.base}{path}?{query_string}&X-Amz-Signature={signature}"


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
