"""Each object is written with one SHA-256 of its body, as a signed checksum header that S3
checks, and that digest is the one the submit validated; nothing hashes the body again.

AWS S3 (and MinIO) refuse a body that does not match the header; moto stores the header
without checking it, so these tests check what is sent."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import urllib3
from botocore.exceptions import ClientError

from hiddenmodel import storage
from tests.conftest import db_scalar
from tests.factories import keyed_org, png, submit

pytestmark = pytest.mark.usefixtures("s3")


@pytest.fixture(params=["direct", "botocore"])
def sent_puts(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[dict[str, str]]]:
    """The headers of every PutObject request the storage module sends, by either of its
    two ways: its own signed requests (storage.DirectS3, the usual one) and botocore's
    (where the direct signer is not used)."""
    seen: list[dict[str, str]] = []
    if request.param == "direct":
        assert storage._direct_client() is not None
        signed = storage.DirectS3.signed_headers

        def record_direct(self: Any, method: str, *args: Any, **kw: Any) -> dict[str, str]:
            headers = signed(self, method, *args, **kw)
            if method == "PUT":
                seen.append(dict(headers))
            return headers

        monkeypatch.setattr(storage.DirectS3, "signed_headers", record_direct)
        yield seen
        return

    monkeypatch.setattr(storage, "_direct_client", lambda: None)

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


# --- the direct client (storage.DirectS3) ------------------------------------------------------


def test_the_direct_client_is_kept_only_where_it_signs_as_botocore_does() -> None:
    """The probe compares the whole Authorization header with the one botocore computes
    for the same request: a signer with another secret or region is not used, and then
    botocore carries every call."""
    client = storage.s3_client()
    direct = storage._direct_client()
    assert direct is not None
    signer = direct.signer
    assert storage._probe_direct(storage._new_client(), signer) is not None
    for wrong in (
        dataclasses.replace(signer, secret_key=signer.secret_key + "x"),
        dataclasses.replace(signer, region="eu-west-3"),
        dataclasses.replace(signer, path_prefix=signer.path_prefix + "other/"),
    ):
        assert storage._probe_direct(storage._new_client(), wrong) is None
    # The probe's request is stopped before it is sent: nothing was stored.
    assert not storage.object_exists(storage._PROBE_PUT_KEY)
    assert client is storage.s3_client()


def test_without_the_direct_client_botocore_stores_and_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage, "_direct_client", lambda: None)
    org, data = uuid.uuid4(), png(8, 8)
    key = storage.object_key(org, uuid.uuid4(), "output", "png")
    storage.put_object(key, data, "image/png", org_id=org, job_id=uuid.uuid4(), kind="output")
    assert storage.get_object(key) == data
    storage.delete_objects([key])
    with pytest.raises(ClientError) as missing:
        storage.get_object(key)
    assert storage.is_missing(missing.value)


def test_a_missing_object_read_directly_is_botocores_missing_object() -> None:
    assert storage._direct_client() is not None
    key = storage.object_key(uuid.uuid4(), uuid.uuid4(), "image", "png")
    with pytest.raises(ClientError) as missing:
        storage.get_object(key)
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    assert missing.value.operation_name == "GetObject"
    assert storage.is_missing(missing.value)


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (S3's SlowDown document) to the first ``failures`` requests, then 200."""

    failures = 0
    seen = 0

    def _answer(self) -> None:
        cls = type(self)
        cls.seen += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if cls.seen <= cls.failures:
            body = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate &amp; retry.</Message></Error>"
            )
            self.send_response(503)
        else:
            body = b"stored bytes"
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[storage.DirectS3]:
    _Flaky.failures, _Flaky.seen = 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    signer = storage.Presigner(
        base=f"http://{host}/bucket/",
        host=host,
        path_prefix="/bucket/",
        access_key="a",
        secret_key="s",
    )
    try:
        yield storage.DirectS3(signer, urllib3.PoolManager())
    finally:
        server.shutdown()
        server.server_close()


def test_the_direct_client_retries_s3s_passing_failures(flaky: storage.DirectS3) -> None:
    """Three attempts in all, as botocore's standard retry mode makes them."""
    _Flaky.failures = 2
    assert flaky.get("orgs/x/a.png") == b"stored bytes"
    assert _Flaky.seen == 3
    _Flaky.failures, _Flaky.seen = 3, 0
    with pytest.raises(ClientError) as refused:
        flaky.put("orgs/x/a.png", b"body", content_type="image/png", checksum="c", tagging="t=1")
    assert _Flaky.seen == 3
    assert refused.value.response["Error"] == {
        "Code": "SlowDown",
        "Message": "Please reduce your request rate & retry.",
    }
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert not storage.is_missing(refused.value)
