"""Each object is written with one SHA-256 of its body, as a signed checksum header that S3
checks, and that digest is the one the submit validated; nothing hashes the body again.

AWS S3 (and MinIO) refuse a body that does not match the header; moto stores the header
without checking it, so these tests check what is sent."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hiddenmodel import storage
from tests.conftest import db_scalar
from tests.factories import keyed_org, png, submit

pytestmark = pytest.mark.usefixtures("s3")


@pytest.fixture
def sent_puts() -> Iterator[list[dict[str, str]]]:
    """The headers of every PutObject request the storage client sends."""
    seen: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        seen.append(
            {
                k.lower(): v.decode() if isinstance(v, bytes) else str(v)
                for k, v in request.headers.items()
            }
        )

    events = storage.s3_client().meta.events
    events.register("before-send.s3.PutObject", record)
    try:
        yield seen
    finally:
        events.unregister("before-send.s3.PutObject", record)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def test_a_put_carries_its_bodys_sha256_and_no_other_hash(
    sent_puts: list[dict[str, str]],
) -> None:
    org, data = uuid.uuid4(), png(64, 48)
    key = storage.object_key(org, uuid.uuid4(), "output", "png")
    storage.put_object(key, data, "image/png", org_id=org, job_id=uuid.uuid4(), kind="output")

    (headers,) = sent_puts
    assert headers["x-amz-checksum-sha256"] == _b64(hashlib.sha256(data).digest())
    # Signed, so a body changed on the way no longer matches a header nobody could rewrite.
    assert "x-amz-checksum-sha256" in headers["authorization"]
    # Not hashed again for the signature, and no CRC32 besides.
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    checksums = {h for h in headers if h.startswith("x-amz-checksum-")}
    assert checksums == {"x-amz-checksum-sha256"}
    assert "x-amz-sdk-checksum-algorithm" not in headers
    assert storage.get_object(key) == data
    assert storage.object_tags(key)["tenant"] == str(org)


def test_a_digest_the_caller_has_is_sent_as_it_is(sent_puts: list[dict[str, str]]) -> None:
    """The caller's digest is trusted, not recomputed: it is what S3 checks the body against
    (AWS S3 or MinIO would refuse this put; moto keeps it)."""
    org, data = uuid.uuid4(), png(32, 32)
    claimed = hashlib.sha256(b"what the caller validated").digest()
    key = storage.object_key(org, uuid.uuid4(), "image", "png")
    storage.put_object(
        key, data, "image/png", org_id=org, job_id=uuid.uuid4(), kind="image", sha256=claimed
    )
    assert sent_puts[0]["x-amz-checksum-sha256"] == _b64(claimed)
    storage.delete_objects([key])


async def test_a_submit_stores_its_input_under_the_digest_it_validated(
    client: httpx.AsyncClient, sent_puts: list[dict[str, str]]
) -> None:
    _, headers_ = await keyed_org(client)
    r = await submit(client, headers_)
    assert r.status_code == 202, r.text
    recorded = db_scalar(
        "SELECT inputs->'image'->>'sha256' FROM jobs WHERE id = :id", id=r.json()["id"]
    )
    (headers,) = sent_puts
    assert headers["x-amz-checksum-sha256"] == _b64(bytes.fromhex(recorded))
