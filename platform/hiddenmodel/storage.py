"""S3 storage: deterministic tenant-prefixed keys, tenant tags on every object."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

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
    key: str, data: bytes, content_type: str, *, org_id: uuid.UUID, job_id: uuid.UUID, kind: str
) -> None:
    s3_client().put_object(
        Bucket=get_settings().s3_bucket,
        Key=key,
        Body=data,
        ContentType=content_type,
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
    params: dict[str, str] = {"Bucket": get_settings().s3_bucket, "Key": key}
    if filename:
        params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
    url: str = s3_client().generate_presigned_url(
        "get_object", Params=params, ExpiresIn=get_settings().presigned_url_ttl_seconds
    )
    return url
