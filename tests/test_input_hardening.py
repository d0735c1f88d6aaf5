"""Input that the database cannot store, or that misleads people, is refused with a 4xx that
names the field: NUL and control characters anywhere (bodies, query, path, forms, the login
form), bidi and invisible characters in names, reserved slugs, JSON nested or sized beyond
reason (job params, Stripe events), and images too small for their operation. Plus the
security headers every answer carries.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import time
import types
import typing
import uuid
import zipfile
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel

from hiddenmodel import storage
from hiddenmodel.inputs import RESERVED_SLUGS, RequestModel, json_depth, parse_json
from hiddenmodel.jobs.operations import all_operations
from tests.conftest import (
    PASSWORD,
    assert_problem,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import endpoints_path, keyed_org, png, submit
from tests.stripe_fixtures import WEBHOOK_SECRET

NUL = "\x00"


def assert_names(response: httpx.Response, *loc: str) -> None:
    """A 422 whose errors name the field at ``loc``."""
    assert_problem(response, 422)
    locs = [tuple(e["loc"]) for e in response.json().get("errors", [])]
    assert any(found[-len(loc) :] == loc for found in locs), (loc, response.json())


# --- NUL and control characters ------------------------------------------------------------


async def test_nul_in_the_login_username_is_refused_before_any_lookup(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/auth/login", data={"username": f"a{NUL}@example.com", "password": PASSWORD}
    )
    assert_names(r, "body", "username")
    r = await client.post("/v1/auth/login", data={"username": "a@example.com", "password": NUL})
    assert_names(r, "body", "password")


async def test_nul_in_names_and_descriptions_is_422_and_nothing_is_written(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    h = org.owner.headers
    before = db_scalar("SELECT count(*) FROM organizations")
    r = await client.post("/v1/orgs", json={"slug": unique("org"), "name": f"A{NUL}B"}, headers=h)
    assert_names(r, "body", "name")
    assert db_scalar("SELECT count(*) FROM organizations") == before

    r = await client.patch(f"/v1/orgs/{org.id}", json={"name": f"x{NUL}"}, headers=h)
    assert_names(r, "body", "name")

    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": f"k{NUL}", "scopes": ["jobs:read"]},
        headers=h,
    )
    assert_names(r, "body", "name")
    assert (
        db_scalar("SELECT count(*) FROM api_keys WHERE organization_id = :o", o=uuid.UUID(org.id))
        == 0
    )

    r = await client.post(
        endpoints_path(org),
        json={"url": "https://example.com/hook", "description": f"d{NUL}"},
        headers=h,
    )
    assert_names(r, "body", "description")
    # Other control characters too, and in list items and dict keys.
    r = await client.post(
        endpoints_path(org),
        json={"url": "https://example.com/hook", "description": "bell\x07"},
        headers=h,
    )
    assert_names(r, "body", "description")
    # Free text keeps its line breaks.
    r = await client.post(
        endpoints_path(org),
        json={"url": "https://example.com/hook", "description": "line one\r\nline two\ttab"},
        headers=h,
    )
    assert r.status_code == 201, r.text


async def test_a_lone_surrogate_is_refused(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    body = b'{"name": "a\\ud800b"}'
    r = await client.patch(
        f"/v1/orgs/{org.id}",
        content=body,
        headers={**org.owner.headers, "Content-Type": "application/json"},
    )
    assert_names(r, "body", "name")


async def test_control_characters_in_query_and_path_are_422_naming_them(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    r = await client.get("/v1/jobs?operation=%00", headers=headers)
    assert_names(r, "query", "operation")
    r = await client.get(f"/v1/orgs/{org.id}/audit-events?action=%00", headers=org.owner.headers)
    assert_names(r, "query", "action")
    r = await client.get("/v1/jobs?operation=%01resize", headers=headers)
    assert_names(r, "query", "operation")
    r = await client.get("/v1/jobs/%00", headers=headers)
    assert_names(r, "path")
    # Ordinary non-ASCII text passes.
    r = await client.get("/v1/jobs?operation=r%C3%A9size", headers=headers)
    assert r.status_code == 200, r.text


async def test_multipart_job_fields_refuse_control_characters(client: httpx.AsyncClient) -> None:
    _org, headers = await keyed_org(client)
    r = await client.post(
        "/v1/jobs",
        data={"operation": f"resize{NUL}", "params": "{}"},
        files={"image": ("a.png", png(), "image/png")},
        headers=headers,
    )
    assert_names(r, "body", "operation")
    r = await submit(client, headers, params={"width": 32, "format": f"png{NUL}"})
    assert_names(r, "body", "params")


async def test_portal_forms_refuse_control_characters(client: httpx.AsyncClient) -> None:
    r = await client.post("/portal/login", data={"email": f"a{NUL}@example.com", "password": "x"})
    assert_names(r, "body", "email")
    # A multipart form is parsed by the page itself, after its CSRF check.
    page = await client.get("/portal/login")
    token = _csrf(page.text)
    r = await client.post(
        "/portal/login",
        files={
            "email": (None, f"a{NUL}@example.com"),
            "password": (None, "x"),
            "csrf_token": (None, token),
        },
    )
    assert r.status_code == 422, r.text
    assert "U+0000" in r.text


# --- names and slugs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Acme\u202eoidutS",  # right-to-left override
        "Acme\u2066Studio\u2069",  # isolate
        "Ac\u200bme",  # zero-width space
        "Acme\ufeff",  # byte-order mark
        "Acme\u00ad",  # soft hyphen
        "Acme\nStudio",  # a line break in a one-line name
    ],
)
async def test_bidi_and_invisible_characters_are_refused_in_names(
    client: httpx.AsyncClient, name: str
) -> None:
    owner = await register(client)
    r = await client.post(
        "/v1/orgs", json={"slug": unique("org"), "name": name}, headers=owner.headers
    )
    assert_names(r, "body", "name")
    org = await make_org(client, owner)
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": name, "scopes": ["jobs:read"]},
        headers=owner.headers,
    )
    assert_names(r, "body", "name")


async def test_names_in_other_scripts_are_accepted(client: httpx.AsyncClient) -> None:
    owner = await register(client)
    r = await client.post(
        "/v1/orgs",
        json={"slug": unique("org"), "name": "الموديل الخفي — Ателье"},
        headers=owner.headers,
    )
    assert r.status_code == 201, r.text


def _csrf(html: str) -> str:
    return html.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


async def test_a_spoofing_key_name_in_the_portal_is_a_form_error(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    page = await client.get("/portal/login")
    r = await client.post(
        "/portal/login",
        data={"email": org.owner.email, "password": PASSWORD, "csrf_token": _csrf(page.text)},
    )
    assert r.status_code in (302, 303), r.text
    keys_page = f"/portal/orgs/{org.id}/api-keys"
    page = await client.get(keys_page)
    assert page.status_code == 200, page.text
    r = await client.post(
        keys_page,
        data={"name": "ci\u202etoor", "scopes": "jobs:read", "csrf_token": _csrf(page.text)},
    )
    assert r.status_code == 422, r.text
    assert "text/html" in r.headers["content-type"] and "U+202E" in r.text
    assert (
        db_scalar("SELECT count(*) FROM api_keys WHERE organization_id = :o", o=uuid.UUID(org.id))
        == 0
    )
    client.cookies.clear()


@pytest.mark.parametrize("slug", ["admin", "api", "portal", "www", "static", "docs"])
async def test_reserved_slugs_are_refused(client: httpx.AsyncClient, slug: str) -> None:
    assert slug in RESERVED_SLUGS
    owner = await register(client)
    r = await client.post("/v1/orgs", json={"slug": slug, "name": "Mine"}, headers=owner.headers)
    assert_names(r, "body", "slug")
    assert db_scalar("SELECT count(*) FROM organizations WHERE slug = :s", s=slug) == 0


# --- every request schema -------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _api_routes(routes: list[Any]) -> list[APIRoute]:
    """The routes of the app and of every router included in it (FastAPI keeps an included
    router as one entry that points at the original)."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found.extend(_api_routes(route.original_router.routes))
    return found


def _request_models(app: Any) -> set[type[BaseModel]]:
    """Every pydantic model a route takes as its body, with the models nested in them."""
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = []
    for route in _api_routes(app.routes):
        if route.body_field is not None:
            for field in route.dependant.body_params:
                todo.extend(_models_in(field.field_info.annotation))
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def _holds_text(annotation: Any) -> bool:
    if annotation is str or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _holds_text(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, set, frozenset, tuple, dict):
        return any(_holds_text(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, str):
        return not hasattr(annotation, "__members__")  # an enum's members are fixed strings
    return False


def _sample(annotation: Any) -> Any:
    """A value of the field's shape that holds a NUL."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sample(args[0])
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in args if a is not type(None) and _holds_text(a)))
    if origin in (list, set, frozenset, tuple):
        return [_sample(args[0])]
    if origin is dict:
        return {f"k{NUL}": 1}
    return f"a{NUL}b"


async def test_every_request_body_schema_refuses_nul_in_every_text_field(app: Any) -> None:
    models = _request_models(app)
    # The walk must find the bodies this module already exercises, or it proves nothing.
    names = {m.__name__ for m in models}
    assert {"OrganizationCreate", "ApiKeyCreate", "WebhookEndpointCreate", "UserCreate"} <= names
    checked = 0
    for model in models:
        assert issubclass(model, RequestModel), f"{model.__name__} is not a RequestModel"
        for name, field in model.model_fields.items():
            if not _holds_text(field.annotation):
                continue
            errors: list[Any] = []
            try:
                model.model_validate({name: _sample(field.annotation)})
            except Exception as exc:  # pydantic.ValidationError
                errors = exc.errors()  # type: ignore[attr-defined]
            # Refused by the shared check, or before it by the field's own pattern.
            assert any(
                e["loc"][:1] == (name,) and e["type"] in ("value_error", "string_pattern_mismatch")
                for e in errors
            ), f"{model.__name__}.{name} accepts a NUL: {errors}"
            checked += 1
    assert checked >= 15


async def test_every_request_schema_in_the_openapi_document_is_checked(
    app: Any, client: httpx.AsyncClient
) -> None:
    """The OpenAPI side of the same walk: every JSON request body is a :class:`RequestModel`,
    or one FastAPI generated for a route's embedded body fields (the account routes of
    fastapi-users); those are posted with a NUL in every text field and must answer 4xx."""
    document = app.openapi()
    schemas = document["components"]["schemas"]
    models = {m.__name__: m for m in _request_models(app)}
    generated = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema", {})
            if "$ref" not in schema:
                continue
            name = schema["$ref"].rsplit("/", 1)[1]
            if name in models:
                assert issubclass(models[name], RequestModel), name
                continue
            assert name.startswith("Body_"), f"{name} is neither a RequestModel nor generated"
            properties = schemas[name]["properties"]
            body = {field: f"a{NUL}@example.com" for field in properties}
            r = await client.request(method.upper(), path, json=body)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
            generated += 1
    assert len(models) >= 10 and generated >= 1


# --- JSON limits ----------------------------------------------------------------------------


def test_the_depth_count_ignores_brackets_in_strings() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [[1]]}') == 3
    assert json_depth('"\\"[["') == 0
    assert parse_json('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


async def test_deeply_nested_params_are_422_naming_params(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    deep = "[" * 100_000 + "]" * 100_000
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": deep},
        files={"image": ("a.png", png(), "image/png")},
        headers=headers,
    )
    assert_names(r, "body", "params")
    nested = "[" * 40 + "]" * 40
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": '{"width": 32, "x": ' + nested + "}"},
        files={"image": ("a.png", png(), "image/png")},
        headers=headers,
    )
    assert_names(r, "body", "params")
    assert (
        db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=uuid.UUID(org.id)) == 0
    )


def _signed(body: bytes) -> dict[str, str]:
    stamp = int(time.time())
    digest = hmac.new(
        WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return {"Stripe-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


def _event(**over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": int(time.time()),
        "data": {"object": {"id": "sub_1", "object": "subscription", "customer": "cus_x"}},
    }
    event.update(over)
    return event


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"id": "evt_1", "type": "invoice.paid", "created": 1, "data": {"object": '
            + b"[" * 50_000
            + b"]" * 50_000
            + b"}}",
            id="deeply-nested",
        ),
        pytest.param(json.dumps(_event(id=f"evt_{NUL}1")).encode(), id="nul-in-id"),
        pytest.param(
            json.dumps(_event(data={"object": {"object": "subscription", "note": NUL}})).encode(),
            id="nul-inside",
        ),
        pytest.param(json.dumps(_event(id=7)).encode(), id="id-not-a-string"),
        pytest.param(json.dumps(_event(created="yesterday")).encode(), id="created-not-int"),
        pytest.param(json.dumps(_event(created=True)).encode(), id="created-a-boolean"),
        pytest.param(json.dumps(_event(type="x" * 300)).encode(), id="type-too-long"),
        pytest.param(json.dumps(_event(data=[])).encode(), id="data-not-an-object"),
        pytest.param(json.dumps([1, 2]).encode(), id="not-an-object"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
async def test_signed_but_malformed_stripe_events_are_400(
    client: httpx.AsyncClient, recorder: Any, body: bytes
) -> None:
    stored = db_scalar("SELECT count(*) FROM stripe_events")
    r = await client.post("/v1/stripe/webhook", content=body, headers=_signed(body))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert db_scalar("SELECT count(*) FROM stripe_events") == stored


async def test_an_unsigned_malformed_event_is_still_a_signature_error(
    client: httpx.AsyncClient, recorder: Any
) -> None:
    body = b"[" * 50_000
    r = await client.post("/v1/stripe/webhook", content=body, headers={"Stripe-Signature": "x"})
    assert_problem(r, 400, "invalid-stripe-signature")


# --- minimum input size ---------------------------------------------------------------------


def test_every_operation_declares_its_minimum_input() -> None:
    for op in all_operations():
        assert op.min_input_side >= 8, op.name
        assert op.describe()["min_input_side"] == op.min_input_side


@pytest.mark.parametrize("operation", [op.name for op in all_operations()])
async def test_an_image_below_the_minimum_is_refused_at_submit_with_nothing_stored(
    client: httpx.AsyncClient, s3: None, operation: str
) -> None:
    org, headers = await keyed_org(client)
    op = next(o for o in all_operations() if o.name == operation)
    side = op.min_input_side
    params = {"width": 32} if operation == "resize" else {}
    r = await submit(client, headers, operation=operation, params=params, image=png(1, 1))
    assert_problem(r, 422, "image-too-small")
    assert r.json()["min_input_side"] == side and str(side) in r.json()["detail"]
    r = await submit(
        client, headers, operation=operation, params=params, image=png(side * 4, side - 1)
    )
    assert_problem(r, 422, "image-too-small")
    assert storage.list_keys(f"orgs/{org.id}/") == []
    assert (
        db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=uuid.UUID(org.id)) == 0
    )
    r = await client.get("/v1/operations")
    listed = {o["name"]: o for o in r.json()}
    assert listed[operation]["min_input_side"] == side


async def test_a_batch_item_below_the_minimum_is_rejected_and_not_stored(
    client: httpx.AsyncClient, s3: None
) -> None:
    org, headers = await keyed_org(client)
    r = await client.post(
        "/v1/batches", json={"operation": "resize", "params": {"width": 32}}, headers=headers
    )
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("dot.png", png(1, 1))
        archive.writestr("ok.png", png(40, 30))
    r = await client.post(
        f"/v1/batches/{batch_id}/items",
        files={"archive": ("shoot.zip", buf.getvalue(), "application/zip")},
        headers=headers,
    )
    assert r.status_code in (200, 201), r.text
    assert (r.json()["added"], r.json()["rejected"]) == (2, 1)
    row = db_scalar(
        "SELECT error_code || ' ' || error_message FROM batch_items "
        "WHERE batch_id = :b AND name = 'dot.png'",
        b=uuid.UUID(batch_id),
    )
    assert row.startswith("image-too-small ") and "at least 8 px" in row, row
    stored = storage.list_keys(f"orgs/{org.id}/batches/")
    assert len(stored) == 1 and "dot" not in stored[0]


async def test_a_manifest_with_nested_params_is_refused(
    client: httpx.AsyncClient, s3: None
) -> None:
    org, headers = await keyed_org(client)
    r = await client.post(
        "/v1/batches", json={"operation": "resize", "params": {"width": 32}}, headers=headers
    )
    batch_id = r.json()["id"]
    nested = '"' + ("[" * 5000 + "]" * 5000).replace('"', '""') + '"'
    manifest = f"image,params\nok.png,{nested}\n".encode()
    r = await client.post(
        f"/v1/batches/{batch_id}/items",
        files=[
            ("files", ("ok.png", png(40, 30), "image/png")),
            ("manifest", ("manifest.csv", manifest, "text/csv")),
        ],
        headers=headers,
    )
    assert r.status_code == 422, r.text
    assert storage.list_keys(f"orgs/{org.id}/batches/") == []


# --- security headers -----------------------------------------------------------------------


async def test_every_answer_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    owner = await register(client)
    for r in (
        await client.get("/v1/operations"),
        await client.get("/v1/nowhere"),
        await client.get("/v1/users/me", headers=owner.headers),
        await client.get("/v1/jobs?operation=%00", headers=owner.headers),
    ):
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert r.headers["referrer-policy"] == "no-referrer", r.request.url
    anonymous = await client.get("/v1/operations")
    assert "no-store" not in anonymous.headers.get("cache-control", "")
    me = await client.get("/v1/users/me", headers=owner.headers)
    assert me.headers["cache-control"] == "no-store"
    key = await make_key(client, await make_org(client, owner))
    r = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key['key']}"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"


async def test_docs_pages_carry_a_policy_that_allows_only_their_own_scripts(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = await client.get(path)
        policy = r.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "object-src 'none'" in policy, path
        script_src = next(p for p in policy.split(";") if p.strip().startswith("script-src"))
        assert "'unsafe-inline'" not in script_src and "http" not in script_src, policy
    swagger = await client.get("/docs")
    assert "'sha256-" in swagger.headers["content-security-policy"]


async def test_the_portal_keeps_its_own_headers(client: httpx.AsyncClient) -> None:
    r = await client.get("/portal/login")
    assert r.headers["referrer-policy"] == "same-origin"
    assert "form-action 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
