"""Guessing control and rate limits: sign-in, reset, verification, invitations and credentials
wait then lock (429 with Retry-After), the same for unknown accounts; every request is rate
limited by API key, user or client address, with headers that agree."""

from __future__ import annotations

import ipaddress
import math
import uuid
from typing import Any

import httpx
import pytest

from hiddenmodel import clientip
from hiddenmodel.settings import get_settings
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    db_rows,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import add_member, keyed_org, mail_count
from tests.polling import until

WRONG = "Wrong-password-1"


def _address() -> str:
    """A client address of this test's own (a documentation range), so counts and locks of
    one test never reach another's."""
    h = uuid.uuid4().hex
    return str(ipaddress.ip_address(f"2001:db8::{h[:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}"))


@pytest.fixture
def behind_proxy(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test client's peer is a trusted proxy; each test speaks from its own address."""
    monkeypatch.setattr(get_settings(), "trusted_proxies", "127.0.0.1/32")
    return {"X-Forwarded-For": _address()}


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> Any:
    settings = get_settings()

    def set_limits(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setattr(settings, name, value)

    return set_limits


async def _login(
    client: httpx.AsyncClient, email: str, password: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/auth/login", data={"username": email, "password": password}, headers=headers
    )


def _retry_after(r: httpx.Response) -> int:
    assert_problem(r, 429, "too-many-attempts")
    return int(r.headers["retry-after"])


async def test_sign_in_waits_then_locks_alike_for_unknown_accounts(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(
        auth_free_attempts=2, auth_lock_after=4, auth_backoff_base_seconds=1.0, auth_lock_seconds=60
    )
    victim = await register(client)
    unknown = f"{unique('nobody')}@example.com"
    answers: dict[str, list[Any]] = {}
    for email in (victim.email, unknown):
        seen: list[Any] = []
        for _ in range(3):
            r = await _login(client, email, WRONG, behind_proxy)
            seen.append((r.status_code, r.json()["type"].rsplit("/", 1)[1]))
        # The third failure started a wait: the next attempt comes too soon.
        r = await _login(client, email, WRONG, behind_proxy)
        assert _retry_after(r) == 1
        seen.append(r.status_code)

        async def attempt_after_wait(email: str = email) -> httpx.Response | None:
            r = await _login(client, email, WRONG, behind_proxy)
            return None if r.status_code == 429 else r

        r4 = await until(attempt_after_wait, what="the wait to end")
        seen.append(r4.status_code)  # the fourth failure: it locks
        # Locked: even the right password waits for the lock time.
        r = await _login(client, email, PASSWORD, behind_proxy)
        assert 50 <= _retry_after(r) <= 60
        seen.append(r.json()["type"])
        answers[email] = seen
    assert answers[victim.email] == answers[unknown]
    assert answers[victim.email][:3] == [(400, "login-bad-credentials")] * 3


async def test_owner_sees_and_clears_a_members_lock(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_free_attempts=1, auth_lock_after=2, auth_lock_seconds=300)
    org = await make_org(client)
    member = await add_member(client, org)
    admin = await add_member(client, org, "admin")
    other = await add_member(client, org)
    for _ in range(2):
        r = await _login(client, member.email, WRONG, behind_proxy)
        assert r.status_code == 400
    _retry_after(await _login(client, member.email, PASSWORD, behind_proxy))

    events = db_rows(
        "SELECT action, target_id, data FROM audit_events WHERE organization_id = :o "
        "AND action = 'member.sign_in_locked'",
        o=org.id,
    )
    assert [(e[0], e[1]) for e in events] == [("member.sign_in_locked", member.id)]
    assert events[0][2]["client_address"] == behind_proxy["X-Forwarded-For"]

    r = await client.get(f"/v1/orgs/{org.id}/sign-in-locks", headers=admin.headers)
    assert r.status_code == 200, r.text
    locks = r.json()
    assert [(lk["user_id"], lk["email"], lk["action"]) for lk in locks] == [
        (member.id, member.email, "sign_in")
    ]
    assert locks[0]["failures"] == 2
    # A plain member may neither see nor clear locks.
    assert_problem(await client.get(f"/v1/orgs/{org.id}/sign-in-locks", headers=other.headers), 403)
    assert_problem(
        await client.delete(f"/v1/orgs/{org.id}/sign-in-locks/{member.id}", headers=other.headers),
        403,
    )
    # An admin may not clear an owner's lock; the owner clears the member's.
    assert_problem(
        await client.delete(
            f"/v1/orgs/{org.id}/sign-in-locks/{org.owner.id}", headers=admin.headers
        ),
        403,
        "owner-required",
    )
    r = await client.delete(
        f"/v1/orgs/{org.id}/sign-in-locks/{member.id}", headers=org.owner.headers
    )
    assert r.status_code == 204, r.text
    assert (
        await client.get(f"/v1/orgs/{org.id}/sign-in-locks", headers=admin.headers)
    ).json() == []
    assert (await _login(client, member.email, PASSWORD, behind_proxy)).status_code == 200
    assert db_rows(
        "SELECT target_id FROM audit_events WHERE organization_id = :o "
        "AND action = 'member.sign_in_lock_cleared'",
        o=org.id,
    ) == [(member.id,)]


async def test_success_forgets_an_accounts_failures(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_free_attempts=2, auth_lock_after=3)
    account = await register(client)
    for _ in range(2):
        assert (await _login(client, account.email, WRONG, behind_proxy)).status_code == 400
    assert (await _login(client, account.email, PASSWORD, behind_proxy)).status_code == 200
    for _ in range(2):
        assert (await _login(client, account.email, WRONG, behind_proxy)).status_code == 400


async def test_client_address_locks_across_accounts_and_proxies_are_checked(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_address_free_attempts=2, auth_address_lock_after=3)
    for _ in range(3):
        r = await _login(client, f"{unique()}@example.com", WRONG, behind_proxy)
        assert r.status_code == 400
    _retry_after(await _login(client, f"{unique()}@example.com", WRONG, behind_proxy))
    # Another address behind the same proxy is not concerned.
    r = await _login(client, f"{unique()}@example.com", WRONG, {"X-Forwarded-For": _address()})
    assert r.status_code == 400


def test_forwarded_for_is_believed_only_from_trusted_proxies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "trusted_proxies", "")
    assert clientip.resolve("10.0.0.5", ["203.0.113.9"]) == "10.0.0.5"
    monkeypatch.setattr(settings, "trusted_proxies", "10.0.0.0/8, 192.0.2.1")
    assert clientip.resolve("10.0.0.5", ["203.0.113.9"]) == "203.0.113.9"
    # A client cannot name itself: the right-most address no trusted proxy added wins.
    assert clientip.resolve("10.0.0.5", ["1.1.1.1, 203.0.113.9, 192.0.2.1"]) == "203.0.113.9"
    assert clientip.resolve("10.0.0.5", ["garbage"]) == "10.0.0.5"
    assert clientip.resolve("198.51.100.4", ["203.0.113.9"]) == "198.51.100.4"


async def test_forgot_password_answers_alike_and_is_throttled(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_free_attempts=1, auth_lock_after=3, auth_backoff_base_seconds=0.001)
    account = await register(client)
    for email in (account.email, f"{unique()}@example.com"):
        codes = [
            (
                await client.post(
                    "/v1/auth/forgot-password", json={"email": email}, headers=behind_proxy
                )
            ).status_code
            for _ in range(3)
        ]
        assert codes == [202, 202, 202]
        r = await client.post(
            "/v1/auth/forgot-password", json={"email": email}, headers=behind_proxy
        )
        assert _retry_after(r) >= 1


async def test_verification_requests_answer_alike_and_are_throttled(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_free_attempts=1, auth_lock_after=2, auth_backoff_base_seconds=0.001)
    account = await register(client)  # unverified: a link was mailed at registration
    for email in (account.email, f"{unique()}@example.com"):
        for _ in range(2):
            r = await client.post(
                "/v1/auth/request-verify-token", json={"email": email}, headers=behind_proxy
            )
            assert r.status_code == 202, r.text
        r = await client.post(
            "/v1/auth/request-verify-token", json={"email": email}, headers=behind_proxy
        )
        assert _retry_after(r) >= 60
    assert mail_count(account.email, "verify") == 3


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/auth/reset-password", {"token": "forged", "password": "Another-strong-77"}),
        ("/v1/auth/verify", {"token": "forged"}),
        ("/v1/auth/confirm-email", {"token": "hme_forged"}),
    ],
)
async def test_token_guessing_is_throttled_by_address(
    client: httpx.AsyncClient,
    strict: Any,
    behind_proxy: dict[str, str],
    path: str,
    body: dict[str, str],
) -> None:
    strict(auth_address_free_attempts=1, auth_address_lock_after=2)
    for _ in range(2):
        r = await client.post(path, json=body, headers=behind_proxy)
        assert r.status_code == 400, r.text
    assert _retry_after(await client.post(path, json=body, headers=behind_proxy)) >= 60


async def test_invitation_guessing_is_throttled(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(auth_free_attempts=1, auth_lock_after=2)
    account = await register(client)
    headers = {**account.headers, **behind_proxy}
    org = await make_org(client)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": f"{unique()}@example.com"},
        headers=org.owner.headers,
    )
    someone_elses = r.json()["token"]
    for token in ("hmi_forged", someone_elses):
        r = await client.post("/v1/invitations/accept", json={"token": token}, headers=headers)
        assert_problem(r, 404, "invitation-not-found")
    r = await client.post("/v1/invitations/accept", json={"token": "x"}, headers=headers)
    assert _retry_after(r) >= 60


async def test_failed_credentials_wait_by_address_and_good_keys_still_work(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    org, good = await keyed_org(client)
    forged = (await make_key(client, org))["key"][:-8] + "AAAAAAAA"
    # Low limits only now: the set-up above signs in from the address all tests share.
    strict(auth_address_free_attempts=1, auth_address_lock_after=2)
    for token in ("hmk_nonsense", forged):
        r = await client.get("/v1/jobs", headers={**bearer(token), **behind_proxy})
        assert r.status_code == 401, r.text
    r = await client.get("/v1/me", headers={**bearer("not-a-session"), **behind_proxy})
    assert _retry_after(r) >= 60
    assert (await client.get("/v1/jobs", headers={**good, **behind_proxy})).status_code == 200


def _policy_and_state(r: httpx.Response) -> tuple[str, int]:
    state = dict(part.split("=") for part in r.headers["ratelimit"].split(";")[1:])
    return r.headers["ratelimit-policy"], int(state["t"])


async def test_requests_without_credentials_are_limited_by_address(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(address_requests_per_minute=2)
    for _ in range(2):
        assert (await client.get("/v1/me", headers=behind_proxy)).status_code == 401
    r = await client.get("/v1/me", headers=behind_proxy)
    assert_problem(r, 429, "rate-limited")
    policy, t = _policy_and_state(r)
    assert policy == '"address";q=2;w=60'
    assert r.json()["subject"] == "address"
    # The headers agree: a request passes again in Retry-After seconds (one of 2 per minute).
    assert int(r.headers["retry-after"]) == t
    assert 25 <= t <= 30
    # Sign-in and registration are requests without credentials too, and credentials sent
    # to a route that does not read them change nothing.
    r = await _login(client, f"{unique()}@example.com", WRONG, behind_proxy)
    assert_problem(r, 429, "rate-limited")
    for credentials in ({"Cookie": "hm_session=forged"}, bearer("forged")):
        r = await _login(client, f"{unique()}@example.com", WRONG, {**behind_proxy, **credentials})
        assert_problem(r, 429, "rate-limited")
    # Health probes and Stripe's signed events are never limited by address.
    assert (await client.get("/healthz", headers=behind_proxy)).status_code == 200
    r = await client.post("/v1/stripe/webhook", content=b"{}", headers=behind_proxy)
    assert r.status_code != 429, r.text


async def test_failed_credentials_count_against_the_address_limit(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    strict(address_requests_per_minute=2)
    headers = {**bearer("not-a-session"), **behind_proxy}
    assert [(await client.get("/v1/me", headers=headers)).status_code for _ in range(2)] == [
        401,
        401,
    ]
    assert_problem(await client.get("/v1/me", headers=headers), 429, "rate-limited")


async def test_signed_in_users_are_limited(client: httpx.AsyncClient, strict: Any) -> None:
    account = await register(client)
    strict(user_requests_per_minute=3)
    for _ in range(3):
        r = await client.get("/v1/me", headers=account.headers)
        assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"user";q=3;w=60'
    r = await client.get("/v1/users/me", headers=account.headers)
    assert_problem(r, 429, "rate-limited")
    assert r.json()["subject"] == "user"
    _, t = _policy_and_state(r)
    assert int(r.headers["retry-after"]) == t == math.ceil(60 / 3)
    # The session cookie is the same user, with the same budget.
    r = await client.post(
        "/v1/auth/cookie/login", data={"username": account.email, "password": PASSWORD}
    )
    cookie = {"Cookie": r.headers["set-cookie"].split(";")[0]}
    assert_problem(await client.get("/v1/me", headers=cookie), 429, "rate-limited")


async def test_operator_user_routes_are_limited_per_user(
    client: httpx.AsyncClient, strict: Any
) -> None:
    operator, other = await register(client), await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    strict(user_requests_per_minute=2)
    for _ in range(2):
        r = await client.get(f"/v1/users/{other.id}", headers=operator.headers)
        assert r.status_code == 200, r.text
    r = await client.get(f"/v1/users/{other.id}", headers=operator.headers)
    assert_problem(r, 429, "rate-limited")
    assert r.json()["subject"] == "user"


@pytest.mark.parametrize(("trusted", "limited"), [("", True), ("127.0.0.1", False)])
def test_the_api_process_believes_forwarded_for_from_trusted_proxies_only(
    trusted: str, limited: bool
) -> None:
    """``hiddenmodel api`` (uvicorn's proxy headers included) takes the client address from
    X-Forwarded-For only when the peer is in HM_TRUSTED_PROXIES."""
    from tests.conftest import _free_port
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel(
        "api-trusted-proxies",
        "api",
        "--port",
        str(port),
        "--workers",
        "1",
        env={"HM_ADDRESS_REQUESTS_PER_MINUTE": "2", "HM_TRUSTED_PROXIES": trusted},
    )
    try:
        wait_port(port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            codes = [
                http.get("/v1/me", headers={"X-Forwarded-For": _address()}).status_code
                for _ in range(3)
            ]
    finally:
        server.stop()
    if limited:
        # Untrusted: three requests of one address (the peer, shared with the other tests of
        # this process, so the second may already wait) against a limit of two.
        assert codes[0] == 401 and codes[-1] == 429, codes
    else:
        assert codes == [401, 401, 401]


async def test_waits_double_then_the_lock_holds(strict: Any) -> None:
    """The waits an account is given, failure after failure (each wait skipped by moving its
    end into the past, as time would)."""
    from hiddenmodel import authguard
    from hiddenmodel.redis import async_redis

    strict(auth_free_attempts=2, auth_lock_after=6, auth_backoff_base_seconds=1.0)
    email, redis = f"{unique()}@example.com", async_redis()
    waits = []
    for _ in range(6):
        attempt = await authguard.begin(authguard.Action.SIGN_IN, account=email, address=_address())
        await authguard.failed(attempt)
        key = attempt.subjects[0].key
        until, locked = await redis.hmget(key, ["until", "locked"])
        seconds, micros = await redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        waits.append((round((int(until) - now_ms) / 1000) if int(until) else 0, int(locked)))
        if not int(locked):
            await redis.hset(key, "until", 0)
    lock = get_settings().auth_lock_seconds
    assert waits == [(0, 0), (0, 0), (1, 0), (2, 0), (4, 0), (lock, 1)]
    with pytest.raises(authguard.TooManyAttempts):
        await authguard.begin(authguard.Action.SIGN_IN, account=email, address=_address())


async def test_portal_pages_count_by_user_or_by_address(
    client: httpx.AsyncClient, strict: Any, behind_proxy: dict[str, str]
) -> None:
    account = await register(client)
    r = await client.post(
        "/v1/auth/cookie/login", data={"username": account.email, "password": PASSWORD}
    )
    signed_in = {"Cookie": r.headers["set-cookie"].split(";")[0], **behind_proxy}
    forged = {"Cookie": "hm_session=forged", **behind_proxy}
    strict(address_requests_per_minute=2, user_requests_per_minute=3)
    # A forged cookie is no credential: two pages for the address, then 429.
    assert [(await client.get("/portal/", headers=forged)).status_code for _ in range(2)] == [
        303,
        303,
    ]
    assert (await client.get("/portal/", headers=forged)).status_code == 429
    # The signed-in user, from the same address, has their own budget.
    codes = [(await client.get("/portal/", headers=signed_in)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
