"""Webhooks end to end: API in process, real PostgreSQL and Redis, Celery worker processes,
and a real HTTP receiver on loopback that records what it is sent."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from hiddenmodel.db import async_tenant_session, commit, tenant_session
from hiddenmodel.jobs import lifecycle
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.settings import get_settings
from hiddenmodel.webhooks import delivery, enqueue, service, signing, urls
from tests.conftest import (
    Org,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    unique,
)
from tests.factories import create_endpoint, endpoints_path
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.usefixtures("services")

# The test environment (tests/conftest.py) sets fast webhook retries for every worker.
MAX_ATTEMPTS = int(os.environ["HM_WEBHOOK_MAX_ATTEMPTS"])


# --- a receiver --------------------------------------------------------------------------


# --- helpers -----------------------------------------------------------------------------


def independently_verified(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification written from the specification, not our module."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(s, expected) for s in headers["webhook-signature"].split(" "))


async def send_test_event(client: httpx.AsyncClient, org: Org, endpoint_id: str) -> dict[str, Any]:
    r = await client.post(f"{endpoints_path(org)}/{endpoint_id}/test", headers=org.owner.headers)
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


async def get_delivery(client: httpx.AsyncClient, org: Org, delivery_id: str) -> dict[str, Any]:
    r = await client.get(
        f"/v1/orgs/{org.id}/webhook-deliveries/{delivery_id}", headers=org.owner.headers
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_delivery(
    client: httpx.AsyncClient, org: Org, delivery_id: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await get_delivery(client, org, delivery_id)
        if found["status"] in ("succeeded", "failed"):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery {delivery_id} did not finish: {found}")


@pytest.fixture
def no_sends(monkeypatch: pytest.MonkeyPatch) -> list[uuid.UUID]:
    """Deliveries created by the API are not handed to the broker (a lost message)."""
    held: list[uuid.UUID] = []

    def hold(org_id: uuid.UUID, ids: Any, *, countdown: float | None = None) -> None:
        held.extend(ids)

    monkeypatch.setattr(enqueue, "send_deliveries", hold)
    return held


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


# --- endpoints and secrets ---------------------------------------------------------------


async def test_secret_is_shown_once_and_stored_encrypted(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    r = await client.post(
        endpoints_path(org),
        json={"url": receiver.url(unique("hook")), "description": "catalog"},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert r.headers["location"] == f"{endpoints_path(org)}/{created['id']}"
    assert r.headers["cache-control"] == "no-store"
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    assert created["event_types"] == [] and created["enabled"] is True
    endpoint_id = created["id"]

    listed = (await client.get(endpoints_path(org), headers=org.owner.headers)).json()
    assert [e["id"] for e in listed["items"]] == [endpoint_id]
    assert "secret" not in listed["items"][0]
    single = (
        await client.get(f"{endpoints_path(org)}/{endpoint_id}", headers=org.owner.headers)
    ).json()
    assert "secret" not in single and single["url"] == created["url"]

    stored = db_rows(
        "SELECT secret_ciphertext FROM webhook_endpoints WHERE id = :id", id=endpoint_id
    )[0][0]
    stored = bytes(stored)
    assert secret.encode() not in stored
    assert secret[6:].encode() not in stored
    assert signing.secret_key(secret) not in stored
    org_id, eid = uuid.UUID(org.id), uuid.UUID(endpoint_id)
    assert signing.decrypt_secret(stored, org_id=org_id, endpoint_id=eid) == secret
    # Bound to its row: the same ciphertext under another endpoint id does not open.
    with pytest.raises(signing.SecretUnreadable):
        signing.decrypt_secret(stored, org_id=org_id, endpoint_id=uuid.uuid4())

    audit = db_rows(
        "SELECT data FROM audit_events WHERE organization_id = :o AND target_id = :t "
        "AND action = 'webhook_endpoint.created'",
        o=org.id,
        t=endpoint_id,
    )
    assert len(audit) == 1 and secret not in json.dumps(audit[0][0])


async def test_test_event_is_signed_per_standard_webhooks(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    path = unique("hook")
    # The filter does not apply to an explicit test.
    created = await create_endpoint(client, org, receiver.url(path), event_types=["job.failed"])
    queued = await send_test_event(client, org, created["id"])
    assert queued["status"] == "pending" and queued["event_type"] == "webhook.test"

    (request,) = await receiver.wait(path, 1)
    headers, body = request.headers, request.body
    assert headers["webhook-id"] == queued["message_id"]
    assert headers["content-type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert independently_verified(created["secret"], headers, body)
    signing.verify(created["secret"], headers, body)
    payload = request.json()
    assert payload["type"] == "webhook.test"
    assert payload["data"]["endpoint_id"] == created["id"]

    with pytest.raises(signing.InvalidSignature):
        signing.verify(created["secret"], headers, body + b" ")
    with pytest.raises(signing.InvalidSignature):
        signing.verify(signing.generate_secret(), headers, body)
    with pytest.raises(signing.InvalidSignature):
        signing.verify(created["secret"], headers, body, now=time.time() + 3600)

    done = await wait_delivery(client, org, queued["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["last_status_code"] == 200 and done["delivered_at"]
    assert done["next_attempt_at"] is None


def test_signature_matches_the_specification_example() -> None:
    # The example of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    headers = signing.webhook_headers(
        [signing.generate_secret(), secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body
    )
    assert headers["webhook-signature"].split(" ")[1] == expected
    signing.verify(secret, headers, body, now=1614265330)


async def test_job_event_reaches_subscribed_endpoints_only(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    paths = {name: unique(name) for name in ("all", "ok", "failures", "off")}
    endpoints = {
        "all": await create_endpoint(client, org, receiver.url(paths["all"])),
        "ok": await create_endpoint(
            client, org, receiver.url(paths["ok"]), event_types=["job.succeeded"]
        ),
        "failures": await create_endpoint(
            client, org, receiver.url(paths["failures"]), event_types=["job.failed", "job.expired"]
        ),
        "off": await create_endpoint(client, org, receiver.url(paths["off"]), enabled=False),
    }
    key = await make_key(client, org, ["jobs:read", "jobs:write"])
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": json.dumps({"width": 32})},
        files={"image": ("photo.png", png(), "image/png")},
        headers=bearer(key["key"]),
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    (to_all,) = await receiver.wait(paths["all"], 1, timeout=40)
    (to_ok,) = await receiver.wait(paths["ok"], 1)
    payload = to_all.json()
    assert payload["type"] == "job.succeeded"
    data = payload["data"]
    assert data["id"] == job_id and data["status"] == "succeeded"
    assert data["operation"] == "resize" and data["outputs"] == ["output"]
    assert data["error"] is None and "gpu_seconds" in data
    assert data["links"] == {"self": f"/v1/jobs/{job_id}"}
    # No presigned URLs: they would expire before a late retry.
    assert b"http" not in to_all.body and b"Signature" not in to_all.body
    # One message, two endpoints: the same webhook-id, each signed with its own secret.
    assert to_all.headers["webhook-id"] == to_ok.headers["webhook-id"]
    assert to_ok.body == to_all.body
    assert independently_verified(endpoints["all"]["secret"], to_all.headers, to_all.body)
    assert independently_verified(endpoints["ok"]["secret"], to_ok.headers, to_ok.body)
    assert not independently_verified(endpoints["ok"]["secret"], to_all.headers, to_all.body)

    # Deliveries are written with the job's end, in one transaction: endpoints without a
    # delivery row then will never be called.
    for name in ("failures", "off"):
        r = await client.get(
            f"{endpoints_path(org)}/{endpoints[name]['id']}/deliveries", headers=org.owner.headers
        )
        assert r.json()["items"] == []
    assert receiver.received(paths["failures"]) == []
    assert receiver.received(paths["off"]) == []
    r = await client.get(
        f"{endpoints_path(org)}/{endpoints['all']['id']}/deliveries", headers=org.owner.headers
    )
    (logged,) = r.json()["items"]
    assert logged["event_type"] == "job.succeeded" and logged["payload"] == payload


async def test_emitting_failed_and_canceled_job_events(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    org_id = uuid.UUID(org.id)
    paths = {name: unique(name) for name in ("failures", "ok")}
    await create_endpoint(
        client, org, receiver.url(paths["failures"]), event_types=["job.failed", "job.canceled"]
    )
    ok = await create_endpoint(
        client, org, receiver.url(paths["ok"]), event_types=["job.succeeded"]
    )
    job_ids = [uuid.uuid4(), uuid.uuid4()]
    for job_id, status in zip(job_ids, ("failed", "canceled"), strict=True):
        db_rows(
            "INSERT INTO jobs (id, organization_id, operation, operation_version, queue, params, "
            "status, inputs, request_hash, error_code, error_message, finished_at) VALUES "
            "(:id, :org, 'resize', '1', 'cpu', '{}', :status, '{}', 'x', 'bad-input', "
            "'The image is empty.', now())",
            id=job_id,
            org=org.id,
            status=status,
        )

    # The worker's way: inside the finishing transaction, sent after the commit.
    with tenant_session(org_id) as session:
        job = session.get(Job, job_ids[0])
        assert job is not None
        ids = service.emit_job_event_sync(session, job, JobStatus.FAILED)
        with pytest.raises(ValueError, match="running"):
            service.emit_job_event_sync(session, job, JobStatus.RUNNING)
    assert len(ids) == 1
    enqueue.send_deliveries(org_id, ids)
    (failed,) = await receiver.wait(paths["failures"], 1)
    body = failed.json()
    assert body["type"] == "job.failed" and body["data"]["id"] == str(job_ids[0])
    assert body["data"]["error"] == {"code": "bad-input", "message": "The image is empty."}
    assert body["data"]["outputs"] == []

    # The API's way (a queued job canceled): recorded in the request's transaction, sent by
    # the session owner's commit.
    async with async_tenant_session(org_id) as session:
        await lifecycle.record_end(session, job_ids[1], JobStatus.CANCELED)
        await commit(session)
    canceled = (await receiver.wait(paths["failures"], 2))[1]
    assert canceled.json()["type"] == "job.canceled"
    assert canceled.headers["webhook-id"] != failed.headers["webhook-id"]
    # Neither event made a delivery for the endpoint that wants successes only.
    assert (
        db_scalar("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :e", e=ok["id"]) == 0
    )
    assert receiver.received(paths["ok"]) == []


# --- retries, the log, redelivery --------------------------------------------------------


async def test_failing_receiver_is_retried_until_it_succeeds(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    path = unique("hook")
    receiver.plans[path] = [500, 503]
    created = await create_endpoint(client, org, receiver.url(path))
    queued = await send_test_event(client, org, created["id"])

    done = await wait_delivery(client, org, queued["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 3 and done["last_status_code"] == 200
    assert done["last_error"] is None
    requests = receiver.received(path)
    assert len(requests) == 3
    assert {r.headers["webhook-id"] for r in requests} == {queued["message_id"]}
    assert all(independently_verified(created["secret"], r.headers, r.body) for r in requests)
    log = done["attempt_log"]
    assert [(a["attempt"], a["status_code"], a["error"]) for a in log] == [
        (1, 500, "HTTP 500"),
        (2, 503, "HTTP 503"),
        (3, 200, None),
    ]
    assert log[0]["response_body"] == "receiver says no"
    r = await client.get(
        f"{endpoints_path(org)}/{created['id']}/deliveries", headers=org.owner.headers
    )
    (listed,) = r.json()["items"]
    assert listed["id"] == queued["id"] and listed["attempts"] == 3


async def test_receiver_that_always_fails_then_redelivery(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    path = unique("hook")
    receiver.always[path] = 500
    created = await create_endpoint(client, org, receiver.url(path))
    queued = await send_test_event(client, org, created["id"])

    failed = await wait_delivery(client, org, queued["id"])
    assert failed["status"] == "failed", failed
    assert failed["attempts"] == MAX_ATTEMPTS and len(failed["attempt_log"]) == MAX_ATTEMPTS
    assert failed["last_status_code"] == 500 and failed["next_attempt_at"] is None
    # Each attempt is logged after its answer came, so the receiver has seen them all.
    assert len(receiver.received(path)) == MAX_ATTEMPTS

    del receiver.always[path]
    r = await client.post(
        f"/v1/orgs/{org.id}/webhook-deliveries/{queued['id']}/redeliver", headers=org.owner.headers
    )
    assert r.status_code == 202, r.text
    again = r.json()
    assert again["id"] != queued["id"] and again["redelivery_of"] == queued["id"]
    assert again["message_id"] == queued["message_id"] and again["attempts"] == 0
    done = await wait_delivery(client, org, again["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    last = receiver.received(path)[-1]
    assert last.headers["webhook-id"] == queued["message_id"]
    assert last.json() == queued["payload"]
    # The original keeps its own history.
    assert (await get_delivery(client, org, queued["id"]))["status"] == "failed"

    r = await client.patch(
        f"{endpoints_path(org)}/{created['id']}", json={"enabled": False}, headers=org.owner.headers
    )
    assert r.status_code == 200 and r.json()["enabled"] is False
    r = await client.post(
        f"/v1/orgs/{org.id}/webhook-deliveries/{queued['id']}/redeliver", headers=org.owner.headers
    )
    assert_problem(r, 409, "webhook-endpoint-disabled")
    r = await client.post(f"{endpoints_path(org)}/{created['id']}/test", headers=org.owner.headers)
    assert_problem(r, 409, "webhook-endpoint-disabled")


@pytest.fixture
def broken_receiver() -> Iterator[tuple[str, list[int]]]:
    """A TCP server that answers garbage, then nothing at all, then a proper 200."""
    listener = socket.create_server(("127.0.0.1", 0))
    served: list[int] = []
    stop = threading.Event()

    def answer(conn: socket.socket, number: int) -> None:
        with conn:
            conn.recv(65536)
            if number == 1:
                conn.sendall(b"SURPRISE\r\n\r\n")
            elif number == 2:
                stop.wait(3)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            served.append(len(served) + 1)
            threading.Thread(target=answer, args=(conn, len(served)), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook", served
    finally:
        stop.set()
        listener.close()


async def test_bad_receivers_are_recorded_and_retried(
    client: httpx.AsyncClient,
    receiver: Receiver,
    broken_receiver: tuple[str, list[int]],
    services: Any,
) -> None:
    org = await make_org(client)
    url, served = broken_receiver
    created = await create_endpoint(client, org, url)
    queued = await send_test_event(client, org, created["id"])
    done = await wait_delivery(client, org, queued["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    errors = [a["error"] for a in done["attempt_log"]]
    assert errors[0] and "Protocol" in errors[0]
    assert errors[1] and errors[1].startswith("timed out")
    assert errors[2] is None and len(served) == 3

    # Redirects are not followed: a 3xx is a failed attempt.
    path = unique("hook")
    receiver.plans[path] = [302]
    created = await create_endpoint(client, org, receiver.url(path))
    queued = await send_test_event(client, org, created["id"])
    done = await wait_delivery(client, org, queued["id"])
    assert [a["status_code"] for a in done["attempt_log"]] == [302, 200]
    assert receiver.received(f"trap-{path}") == []
    assert all(worker.alive() for worker in services.workers)


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    path = unique("hook")
    created = await create_endpoint(client, org, receiver.url(path))
    old = created["secret"]
    r = await client.post(
        f"{endpoints_path(org)}/{created['id']}/rotate-secret", headers=org.owner.headers
    )
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    rotated = r.json()
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    overlap = get_settings().webhook_secret_rotation_overlap_hours * 3600
    expires = rotated["previous_secret_expires_at"]
    assert expires is not None
    remaining = datetime.fromisoformat(expires).timestamp() - time.time()
    assert overlap - 60 < remaining <= overlap

    await send_test_event(client, org, created["id"])
    (during,) = await receiver.wait(path, 1)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert independently_verified(secret, during.headers, during.body)
        signing.verify(secret, during.headers, during.body)

    db_rows(
        "UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second' "
        "WHERE id = :id",
        id=created["id"],
    )
    await send_test_event(client, org, created["id"])
    after = (await receiver.wait(path, 2))[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert independently_verified(new, after.headers, after.body)
    assert not independently_verified(old, after.headers, after.body)
    assert (
        db_scalar(
            "SELECT count(*) FROM audit_events WHERE target_id = :t "
            "AND action = 'webhook_endpoint.secret_rotated'",
            t=created["id"],
        )
        == 1
    )


# --- URL safety --------------------------------------------------------------------------


def _resolver(*addresses: str) -> Any:
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://172.16.0.1/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://0.0.0.0/",
        "https://100.64.0.1/",
        "https://224.0.0.1/",
        "https://240.0.0.1/",
        "https://[::1]/hook",
        "https://[::]/hook",
        "https://[fc00::1]/hook",
        "https://[fe80::1]/hook",
        "https://[ff02::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://[64:ff9b::a00:1]/hook",
        "https://localhost/hook",
        "http://example.com/hook",
        "ftp://example.com/hook",
        "https://user:pass@example.com/hook",
        "https:///hook",
        "https://example.com:99999/hook",
        "not a url",
    ],
)
def test_private_and_malformed_urls_are_refused(url: str) -> None:
    public = _resolver("93.184.215.14")
    with pytest.raises(urls.UrlNotAllowed):
        urls.check_url(url, allow_private=False, resolver=None if "localhost" in url else public)


def test_a_host_resolving_to_any_private_address_is_refused() -> None:
    for addresses in (
        ("127.0.0.1",),
        ("93.184.215.14", "10.0.0.7"),
        ("::1",),
        ("2606:2800:220:1::1", "::ffff:169.254.169.254"),
    ):
        with pytest.raises(urls.UrlNotAllowed, match="resolves to"):
            urls.check_url(
                "https://hooks.example.com/x", allow_private=False, resolver=_resolver(*addresses)
            )

    def unresolvable(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror("no such host")

    with pytest.raises(urls.UrlUnresolvable):
        urls.check_url("https://nowhere.example/x", allow_private=False, resolver=unresolvable)


def test_public_urls_are_pinned_to_the_checked_address() -> None:
    checked = urls.check_url(
        "https://hooks.example.com:8443/in?x=1",
        allow_private=False,
        resolver=_resolver("93.184.215.14", "2606:2800:220:1::1"),
    )
    assert [str(a) for a in checked.addresses] == ["93.184.215.14", "2606:2800:220:1::1"]
    url, headers, extensions = checked.pinned(checked.addresses[1])
    assert url == "https://[2606:2800:220:1::1]:8443/in?x=1"
    assert headers == {"Host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    # Private targets (development, these tests) may use http and loopback.
    assert urls.check_url("http://127.0.0.1:8080/x", allow_private=True).addresses == ()


def test_backoff_is_exponential_capped_and_jittered() -> None:
    settings = get_settings().model_copy(
        update={"webhook_backoff_base_seconds": 2.0, "webhook_backoff_cap_seconds": 30.0}
    )
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (9, 30.0)):
        delays = [delivery.backoff_seconds(attempt, settings) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(set(delays)) > 1


async def test_private_urls_are_refused_by_the_api(
    client: httpx.AsyncClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = await make_org(client)
    created = await create_endpoint(client, org, receiver.url(unique("hook")))
    monkeypatch.setattr(get_settings(), "webhook_allow_private_urls", False)
    for url in (
        "http://127.0.0.1:9/x",
        "https://127.0.0.1/x",
        "https://10.0.0.1/x",
        "https://[::1]/x",
        "https://localhost/x",
    ):
        r = await client.post(endpoints_path(org), json={"url": url}, headers=org.owner.headers)
        assert_problem(r, 422, "webhook-url-not-allowed")
    r = await client.patch(
        f"{endpoints_path(org)}/{created['id']}",
        json={"url": "https://169.254.169.254/latest"},
        headers=org.owner.headers,
    )
    assert_problem(r, 422, "webhook-url-not-allowed")
    assert (
        db_scalar("SELECT count(*) FROM webhook_endpoints WHERE organization_id = :o", o=org.id)
        == 1
    )


async def test_url_is_checked_again_at_delivery_and_not_retried(
    client: httpx.AsyncClient,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    no_sends: list[uuid.UUID],
) -> None:
    org = await make_org(client)
    path = unique("hook")
    created = await create_endpoint(client, org, receiver.url(path))
    queued = await send_test_event(client, org, created["id"])
    assert no_sends == [uuid.UUID(queued["id"])]
    # Allowed when saved; refused when sent (as after a DNS change to a private address).
    monkeypatch.setattr(get_settings(), "webhook_allow_private_urls", False)
    outcome = await asyncio.to_thread(
        delivery.attempt_delivery, uuid.UUID(org.id), uuid.UUID(queued["id"])
    )
    assert outcome == delivery.Outcome("refused")
    done = await get_delivery(client, org, queued["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert "not allowed" in done["last_error"] and done["next_attempt_at"] is None
    assert receiver.received(path) == []


# --- lost messages -----------------------------------------------------------------------


async def test_sweeper_resends_deliveries_whose_message_was_lost(
    client: httpx.AsyncClient,
    receiver: Receiver,
    no_sends: list[uuid.UUID],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    org = await make_org(client)
    path = unique("hook")
    created = await create_endpoint(client, org, receiver.url(path))
    lost = await send_test_event(client, org, created["id"])
    abandoned = await send_test_event(client, org, created["id"])
    assert len(no_sends) == 2
    monkeypatch.undo()
    # Never sent; and one claimed by a worker that died mid-attempt (its lease ran out).
    db_rows(
        "UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 minute', "
        "enqueued_at = now() - interval '1 minute' WHERE id = :id",
        id=lost["id"],
    )
    db_rows(
        "UPDATE webhook_deliveries SET status = 'delivering', attempts = 1, "
        "next_attempt_at = now() - interval '1 minute', enqueued_at = now() - interval "
        "'1 minute' WHERE id = :id",
        id=abandoned["id"],
    )
    assert await asyncio.to_thread(enqueue.sweep_due_deliveries) >= 2
    first = await wait_delivery(client, org, lost["id"])
    second = await wait_delivery(client, org, abandoned["id"])
    assert (first["status"], first["attempts"]) == ("succeeded", 1)
    assert (second["status"], second["attempts"]) == ("succeeded", 2)
    assert len(receiver.received(path)) == 2
    # Re-sent once per grace period, not on every pass.
    db_rows(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now() - "
        "interval '1 minute', enqueued_at = now() WHERE id = :id",
        id=lost["id"],
    )
    swept = await asyncio.to_thread(enqueue.sweep_due_deliveries)
    assert (
        db_scalar("SELECT status FROM webhook_deliveries WHERE id = :id", id=lost["id"])
        == "pending"
    ), swept


# --- the API's edges ---------------------------------------------------------------------


async def test_validation_errors_are_problems(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org = await make_org(client)
    h = org.owner.headers
    good = receiver.url(unique("hook"))
    for body, status, kind in [
        ({"url": "not a url"}, 422, "webhook-url-not-allowed"),
        ({"url": "ftp://example.com/x"}, 422, "webhook-url-not-allowed"),
        ({}, 422, "validation-error"),
        ({"url": good, "event_types": ["job.exploded"]}, 422, "validation-error"),
        ({"url": good, "description": "x" * 501}, 422, "validation-error"),
        ({"url": good, "events": ["job.failed"]}, 422, "validation-error"),
        ({"url": "https://x/" + "a" * 2048}, 422, "validation-error"),
    ]:
        assert_problem(await client.post(endpoints_path(org), json=body, headers=h), status, kind)
    r = await client.post(
        endpoints_path(org), content=b"{nope", headers={**h, "content-type": "application/json"}
    )
    assert_problem(r, 400, "malformed-json")
    created = await create_endpoint(client, org, good)
    one = f"{endpoints_path(org)}/{created['id']}"
    assert_problem(await client.patch(one, json={"url": None}, headers=h), 422, "validation-error")
    assert_problem(
        await client.get(f"{endpoints_path(org)}/nope", headers=h), 422, "validation-error"
    )
    assert_problem(
        await client.get(endpoints_path(org), params={"cursor": "!!"}, headers=h),
        400,
        "invalid-cursor",
    )
    assert_problem(
        await client.get(f"{one}/deliveries", params={"status": "bogus"}, headers=h),
        422,
        "validation-error",
    )
    assert_problem(
        await client.get(f"{endpoints_path(org)}/{uuid.uuid4()}", headers=h),
        404,
        "webhook-endpoint-not-found",
    )


async def test_routes_are_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    ours = {
        (method, path): op
        for path, item in spec["paths"].items()
        if "/webhook-" in path
        for method, op in item.items()
    }
    assert len(ours) == 10
    for op in ours.values():
        assert op["operationId"] and op["tags"] == ["webhooks"]
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert spec["components"]["schemas"]["WebhookEndpointCreate"].get("examples")


async def test_update_list_delete_and_audit(client: httpx.AsyncClient, receiver: Receiver) -> None:
    org = await make_org(client)
    h = org.owner.headers
    ids = [
        (await create_endpoint(client, org, receiver.url(unique("hook"))))["id"] for _ in range(3)
    ]
    page = (await client.get(endpoints_path(org), params={"limit": 2}, headers=h)).json()
    assert [e["id"] for e in page["items"]] == ids[:0:-1] and page["next_cursor"]
    rest = (
        await client.get(
            endpoints_path(org), params={"limit": 2, "cursor": page["next_cursor"]}, headers=h
        )
    ).json()
    assert [e["id"] for e in rest["items"]] == ids[:1] and rest["next_cursor"] is None

    one = f"{endpoints_path(org)}/{ids[0]}"
    r = await client.patch(
        one,
        json={"description": "new", "event_types": ["job.failed", "job.succeeded", "job.failed"]},
        headers=h,
    )
    assert r.status_code == 200, r.text
    assert r.json()["event_types"] == ["job.failed", "job.succeeded"]
    assert r.json()["description"] == "new"
    queued = await send_test_event(client, org, ids[0])
    await wait_delivery(client, org, queued["id"])

    r = await client.delete(one, headers=h)
    assert r.status_code == 204
    assert_problem(await client.get(one, headers=h), 404, "webhook-endpoint-not-found")
    assert (
        db_scalar("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = :e", e=ids[0]) == 0
    )
    actions = [
        row[0]
        for row in db_rows(
            "SELECT action FROM audit_events WHERE organization_id = :o AND target_id = :t "
            "ORDER BY created_at",
            o=org.id,
            t=ids[0],
        )
    ]
    assert actions == [
        "webhook_endpoint.created",
        "webhook_endpoint.updated",
        "webhook_endpoint.tested",
        "webhook_endpoint.deleted",
    ]


async def test_other_organizations_and_scopes(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org_a = await make_org(client)
    org_b = await make_org(client)
    created = await create_endpoint(client, org_a, receiver.url(unique("hook")))
    queued = await send_test_event(client, org_a, created["id"])
    await wait_delivery(client, org_a, queued["id"])

    hb = org_b.owner.headers
    theirs = f"{endpoints_path(org_b)}/{created['id']}"
    for method, url in [
        ("GET", theirs),
        ("PATCH", theirs),
        ("DELETE", theirs),
        ("POST", f"{theirs}/rotate-secret"),
        ("POST", f"{theirs}/test"),
        ("GET", f"{theirs}/deliveries"),
    ]:
        r = await client.request(
            method, url, headers=hb, json={"enabled": False} if method == "PATCH" else None
        )
        assert_problem(r, 404, "webhook-endpoint-not-found")
    for method, suffix in [("GET", ""), ("POST", "/redeliver")]:
        r = await client.request(
            method, f"/v1/orgs/{org_b.id}/webhook-deliveries/{queued['id']}{suffix}", headers=hb
        )
        assert_problem(r, 404, "webhook-delivery-not-found")
    # B's owner in A's organization: no such organization.
    assert_problem(await client.get(endpoints_path(org_a), headers=hb), 404)
    assert (await client.get(endpoints_path(org_b), headers=hb)).json()["items"] == []

    jobs_key = await make_key(client, org_a, ["jobs:read", "jobs:write"])
    r = await client.get(endpoints_path(org_a), headers=bearer(jobs_key["key"]))
    assert_problem(r, 403, "missing-scope")
    admin_key = await make_key(client, org_a, ["admin"])
    r = await client.get(endpoints_path(org_a), headers=bearer(admin_key["key"]))
    assert r.status_code == 200 and [e["id"] for e in r.json()["items"]] == [created["id"]]
    assert_problem(await client.get(endpoints_path(org_b), headers=bearer(admin_key["key"])), 404)
