"""Schemathesis against the API running as its own process: every operation of the OpenAPI
document, a few generated requests each, as tenant A (its org admin API key where an operation
takes API keys, its owner's login token otherwise). Each answer must not be a server error,
must match the documented response schema, and must not mention tenant B.

The example count is small on purpose: the suite runs this on every change, so it looks for
the classes of bugs (a 500 on odd input, an undocumented answer) rather than exhausting them.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import PASSWORD, _free_port, unique

# Operations the fuzzer must not call, and why.
EXCLUDED = {
    # Ends tenant A's session token: every later case would only see 401s.
    ("POST", "/v1/auth/logout"),
    ("POST", "/v1/auth/cookie/logout"),
    # Account changes (email, password) belong to the sign-in and account area, which has its
    # own tests; a generated change of tenant A's password or email would also lock the rest
    # of the run out.
    ("PATCH", "/v1/users/me"),
    # Two-factor enrollment and its removal take the current password: generated ones count
    # as failed sign-ins of tenant A (tests/test_totp.py covers them).
    ("POST", "/v1/users/me/totp"),
    ("DELETE", "/v1/users/me/totp"),
}
# Per operation and generation mode; HM_FUZZ_EXAMPLES raises it for a deeper run by hand.
EXAMPLES_PER_OPERATION = int(os.environ.get("HM_FUZZ_EXAMPLES", "4"))


@dataclass
class Tenant:
    org_id: str
    slug: str
    token: str
    key: str
    key_prefix: str


def _tenant(client: httpx.Client) -> Tenant:
    email = f"{unique('fuzz')}@example.com"
    r = client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = client.post("/v1/auth/login", data={"username": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    slug = unique("fuzz")
    r = client.post("/v1/orgs", json={"slug": slug, "name": slug.title()}, headers=auth)
    assert r.status_code == 201, r.text
    org_id = r.json()["id"]
    r = client.post(
        f"/v1/orgs/{org_id}/api-keys", json={"name": "fuzz", "scopes": ["admin"]}, headers=auth
    )
    assert r.status_code == 201, r.text
    return Tenant(org_id, slug, token, r.json()["key"], r.json()["prefix"])


@pytest.fixture(scope="module")
def live_api(s3: None, recorder: Any) -> Iterator[tuple[str, Tenant, Tenant]]:
    """The API as its own process (with Stripe pointed at the recording server), and two
    tenants in it."""
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel("api-fuzz", "api", "--port", str(port), "--workers", "1")
    try:
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            yield base, _tenant(client), _tenant(client)
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-4000:]


def _credentials(operation: Any, a: Tenant) -> dict[str, str]:
    accepted = [name for option in operation.definition.raw.get("security", []) for name in option]
    if "apiKey" in accepted:
        return {"Authorization": f"Bearer {a.key}"}
    if "session" in accepted:
        return {"Authorization": f"Bearer {a.token}"}
    return {}


def _with_nul(value: Any) -> Any:
    """``value`` with a NUL in each string it holds: the character PostgreSQL refuses."""
    if isinstance(value, str):
        return value + "\x00"
    if isinstance(value, dict):
        return {key: _with_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_nul(item) for item in value]
    return value


def _nul_case(case: Any) -> Any:
    if case.query:
        case.query = _with_nul(case.query)
    if isinstance(case.body, dict | list):
        case.body = _with_nul(case.body)
    return case


def _fuzz(operation: Any, base: str, a: Tenant, b: Tenant, statuses: list[int]) -> None:
    """Generated requests for one operation; raises the first failure hypothesis keeps."""

    fixed = {"org_id": a.org_id} if "{org_id}" in operation.path else None
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    strategies = []
    for mode in modes:
        try:
            strategies.append(operation.as_strategy(mode, path_parameters=fixed))
        except Exception:  # an operation with nothing to negate has no negative cases
            continue
    # Valid requests with a NUL in every query and body string: text the database refuses.
    strategies.append(strategies[0].map(_nul_case))

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(strategies),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(
            base_url=base,
            headers=_credentials(operation, a),
            checks=[not_a_server_error, response_schema_conformance],
        )
        statuses.append(response.status_code)
        for secret in (b.org_id, b.slug, b.key_prefix, b.token, b.key):
            assert secret not in response.text, "tenant B leaked"

    run()


def test_every_operation_survives_generated_requests(
    live_api: tuple[str, Tenant, Tenant],
) -> None:
    base, a, b = live_api
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in EXCLUDED:
            continue
        operations += 1
        try:
            _fuzz(operation, base, a, b, statuses)
        # Every operation runs; all failures are reported together (schemathesis raises its
        # findings as an exception group).
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert operations >= 70, operations
    # The requests reached the routes: most answer, some succeed.
    assert len(statuses) >= 2 * operations, len(statuses)
    assert sum(200 <= s < 300 for s in statuses) >= operations // 2, sorted(statuses)
    print(sorted(collections.Counter(statuses).items()))
    assert not failures, "\n\n".join(failures)
