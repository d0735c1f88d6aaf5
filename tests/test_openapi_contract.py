"""The OpenAPI document's security matches what the API enforces.

Which operations need credentials, and which credentials each accepts, is found by calling
every operation in the document, not from a list kept by hand.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
from openapi_spec_validator import validate

from tests.conftest import Account, make_key, make_org, register

API_KEY, SESSION, COOKIE = "apiKey", "session", "sessionCookie"
# Problem kinds that mean "these credentials are not accepted here" (not "not allowed").
REJECTS_API_KEY = {"user-required", "operator-required"}
REJECTS_SESSION = {"api-key-required"}


async def _spec(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    spec: dict[str, Any] = r.json()
    return spec


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in {"get", "put", "post", "patch", "delete"}
    ]


def _url(path: str, org_id: str | None = None) -> str:
    """A concrete URL: the caller's organization where one is named, random ids elsewhere."""

    def fill(match: re.Match[str]) -> str:
        if match.group(1) == "org_id" and org_id is not None:
            return org_id
        return str(uuid.uuid4())

    return re.sub(r"\{([^}]+)\}", fill, path)


def _schemes(op: dict[str, Any]) -> set[str]:
    return {name for requirement in op["security"] for name in requirement}


def _kind(r: httpx.Response) -> str | None:
    if not r.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    kind = r.json().get("type", "")
    return str(kind).rsplit("/", 1)[-1] or None


async def _call(
    client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    # No body: a route that authenticates answers 401/403 before it validates one.
    return await client.request(method, url, headers=headers or {})


async def test_document_is_valid_openapi(client: httpx.AsyncClient) -> None:
    validate(await _spec(client))


async def test_every_operation_declares_security_and_schemes_exist(
    client: httpx.AsyncClient,
) -> None:
    spec = await _spec(client)
    defined = spec["components"]["securitySchemes"]
    assert defined[API_KEY]["type"] == "http"
    assert defined[API_KEY]["scheme"] == "bearer"
    assert "hmk_" in defined[API_KEY]["description"]
    assert defined[SESSION]["flows"]["password"]["tokenUrl"] == "/v1/auth/login"
    assert defined[COOKIE] == {
        "type": "apiKey",
        "in": "cookie",
        "name": "hm_session",
        "description": defined[COOKIE]["description"],
    }
    for method, path, op in _operations(spec):
        assert "security" in op, (method, path)
        for requirement in op["security"]:
            # One scheme per requirement object: alternatives, not all at once.
            assert len(requirement) == 1, (method, path, requirement)
            for name, scopes in requirement.items():
                assert name in defined, (method, path, name)
                # http/apiKey schemes take no scopes; they live in x-required-scopes.
                assert scopes == [], (method, path)
        for scope in op.get("x-required-scopes", []):
            assert scope in {"jobs:read", "jobs:write", "usage:read", "admin"}
            assert API_KEY in _schemes(op), (method, path)
            assert f"`{scope}`" in op["description"], (method, path)


async def test_security_matches_what_each_operation_enforces(client: httpx.AsyncClient) -> None:
    """Without credentials an operation answers 401 exactly when it declares security; with
    an API key or a session token, it refuses the kind of credential it does not declare."""
    spec = await _spec(client)
    org = await make_org(client)
    key = await make_key(client, org, scopes=["admin"])
    key_headers = {"Authorization": f"Bearer {key['key']}"}
    secured = 0
    for method, path, op in _operations(spec):
        anonymous = await _call(client, method, _url(path))
        if op["security"]:
            secured += 1
            assert anonymous.status_code == 401, (method, path, anonymous.text)
        else:
            assert anonymous.status_code != 401, (method, path, anonymous.text)
            assert _kind(anonymous) not in REJECTS_SESSION | REJECTS_API_KEY, (method, path)
            continue
        schemes = _schemes(op)

        r = await _call(client, method, _url(path, org.id), key_headers)
        refused = r.status_code == 401 or (r.status_code == 403 and _kind(r) in REJECTS_API_KEY)
        assert refused == (API_KEY not in schemes), (method, path, r.status_code, r.text)

        # Logging out ends the session it is called with: use one of its own.
        session: Account = await register(client) if path.endswith("/logout") else org.owner
        r = await _call(client, method, _url(path, org.id), session.headers)
        refused = r.status_code == 401 or (r.status_code == 403 and _kind(r) in REJECTS_SESSION)
        assert refused == (SESSION not in schemes), (method, path, r.status_code, r.text)
    # Most of the API needs credentials; the public part is small.
    assert secured > 50


async def test_scopes_declared_are_the_scopes_enforced(client: httpx.AsyncClient) -> None:
    """A key with one scope is refused `missing-scope` only by operations whose
    `x-required-scopes` lack that scope (the scope is read from the same permission
    dependencies that refuse)."""
    spec = await _spec(client)
    org = await make_org(client)
    key = await make_key(client, org, scopes=["jobs:read"])
    headers = {"Authorization": f"Bearer {key['key']}"}
    checked = 0
    for method, path, op in _operations(spec):
        if API_KEY not in _schemes(op):
            continue
        r = await _call(client, method, _url(path, org.id), headers)
        declared = op.get("x-required-scopes", [])
        if _kind(r) == "missing-scope":
            checked += 1
            assert declared and "jobs:read" not in declared, (method, path, declared)
    assert checked > 10
    usage = [op for _, path, op in _operations(spec) if path.startswith("/v1/usage")]
    assert usage and all(op.get("x-required-scopes") == ["usage:read"] for op in usage)
