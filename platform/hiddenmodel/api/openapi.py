"""Security in the OpenAPI document, derived from each route's authentication dependencies.

The API authenticates inside its own dependencies (``tenants.auth``) rather than through
FastAPI's security classes: one ``Authorization: Bearer`` header carries either an
organization API key or a user's session token. FastAPI cannot see that, so the document
is completed here, in one place:

* ``components.securitySchemes`` declares the API key, the session token and the session
  cookie;
* every operation gets ``security``: the alternatives that all of its registered
  authentication dependencies accept (:data:`tenants.auth.ACCEPTED_CREDENTIALS`), or ``[]``
  when it needs no credentials. Operations secured by fastapi-users' own ``Security``
  dependencies keep what FastAPI derived;
* API key scopes are fixed per key and cannot be listed in an ``http`` requirement, so the
  scopes (and member roles) an operation requires go to ``x-required-scopes`` and
  ``x-required-roles`` and to its description. They are read from the route's permission
  dependencies (:data:`tenants.auth.REQUIRED_PERMISSIONS`, ``scope: ManageMembers``); a route
  may set them itself with ``openapi_extra`` when the check lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute

from tenants.auth import (
    ACCEPTED_CREDENTIALS,
    API_KEY_PREFIX,
    API_KEY_SCHEME,
    REQUIRED_PERMISSIONS,
    Permission,
)
from tenants.models import Scope
from tenants.users import SESSION_COOKIE_SCHEME, SESSION_SCHEME, bearer_backend, cookie_backend

# Alternatives are listed in this order.
SCHEME_ORDER = (API_KEY_SCHEME, SESSION_SCHEME, SESSION_COOKIE_SCHEME)

API_KEY_SECURITY_SCHEME: dict[str, Any] = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": f"{API_KEY_PREFIX}_<organization>_<secret>",
    "description": (
        "An organization API key, sent as `Authorization: Bearer "
        f"{API_KEY_PREFIX}_<organization>_<secret>`. Keys are created with "
        "`POST /v1/orgs/{org_id}/api-keys`, act only in their own organization and carry the "
        "scopes chosen when they were created, which never change ("
        + ", ".join(f"`{s.value}`" for s in Scope)
        + f"; `{Scope.ADMIN.value}` allows everything). The scopes an operation needs are in "
        "its `x-required-scopes` and its description."
    ),
}


def _dependency_calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _dependency_calls(sub)


def api_routes(app: FastAPI) -> Iterator[APIRoute]:
    """The app's API routes as the document sees them (with their routers' dependencies)."""
    iter_route_contexts = getattr(routing, "iter_route_contexts", None)
    if iter_route_contexts is None:  # FastAPI before included routers were kept lazily
        yield from (route for route in app.routes if isinstance(route, APIRoute))
        return
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            # A route context answers for the route it wraps (path, methods, dependant...).
            yield context


def accepted_schemes(route: APIRoute) -> list[str] | None:
    """The schemes a route accepts, or None when no registered dependency authenticates it."""
    accepted: frozenset[str] | None = None
    for call in _dependency_calls(route.dependant):
        schemes = ACCEPTED_CREDENTIALS.get(call)
        if schemes is not None:
            accepted = schemes if accepted is None else accepted & schemes
    if accepted is None:
        return None
    return [name for name in SCHEME_ORDER if name in accepted]


def required_permissions(route: APIRoute) -> list[Permission]:
    """The permissions a route checks through its permission dependencies
    (:func:`tenants.auth.requires`), in the order they run."""
    found: list[Permission] = []
    for call in _dependency_calls(route.dependant):
        permission = REQUIRED_PERMISSIONS.get(call)
        if permission is not None and permission not in found:
            found.append(permission)
    return found


def _describe(schemes: list[str], scopes: list[str], roles: list[str]) -> str:
    ways = []
    if API_KEY_SCHEME in schemes:
        text = "an API key"
        if scopes:
            listed = " and ".join(f"`{s}`" for s in scopes)
            text += f" with the {listed} scope" + ("s" if len(scopes) > 1 else "")
            if Scope.ADMIN.value not in scopes:
                text += f" (or `{Scope.ADMIN.value}`)"
        ways.append(text)
    if SESSION_SCHEME in schemes:
        text = "a session token"
        if roles:
            text += " of a member whose role is " + " or ".join(f"`{r}`" for r in roles)
        ways.append(text)
    if SESSION_COOKIE_SCHEME in schemes:
        ways.append("the session cookie")
    return "**Authentication:** " + " or ".join(ways) + "."


def _secure_operation(operation: dict[str, Any], route: APIRoute) -> None:
    schemes = accepted_schemes(route)
    if schemes is None:
        # Secured by FastAPI's own Security dependencies (fastapi-users), or public.
        operation.setdefault("security", [])
        return
    operation["security"] = [{name: []} for name in schemes]
    permissions = required_permissions(route)
    scopes = list(operation.get("x-required-scopes", []))
    roles = list(operation.get("x-required-roles", []))
    for permission in permissions:
        if permission.scope.value not in scopes:
            scopes.append(permission.scope.value)
        for role in sorted(r.value for r in permission.roles):
            if role not in roles:
                roles.append(role)
    if API_KEY_SCHEME in schemes and scopes:
        operation["x-required-scopes"] = scopes
    else:
        operation.pop("x-required-scopes", None)
    if SESSION_SCHEME in schemes and roles:
        operation["x-required-roles"] = roles
    else:
        operation.pop("x-required-roles", None)
    note = _describe(schemes, operation.get("x-required-scopes", []), roles)
    description = operation.get("description")
    operation["description"] = f"{description}\n\n{note}" if description else note


def add_security(schema: dict[str, Any], app: FastAPI) -> None:
    """Complete ``schema`` (the app's OpenAPI document) in place; see the module docstring."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[API_KEY_SCHEME] = API_KEY_SECURITY_SCHEME
    for backend in (bearer_backend, cookie_backend):
        security = backend.transport.scheme
        schemes[security.scheme_name] = jsonable_encoder(
            security.model, by_alias=True, exclude_none=True
        )
    paths = schema.get("paths", {})
    for route in api_routes(app):
        if not route.include_in_schema:
            continue
        item = paths.get(route.path_format, {})
        for method in route.methods or ():
            operation = item.get(method.lower())
            if operation is not None:
                _secure_operation(operation, route)


def _binary_strings(node: Any) -> None:
    """Mark uploaded files as ``format: binary`` beside 3.1's ``contentMediaType``: client
    generators (openapi-python-client) read files from the former only."""
    if isinstance(node, dict):
        if node.get("type") == "string" and "contentMediaType" in node:
            node.setdefault("format", "binary")
        for value in node.values():
            _binary_strings(value)
    elif isinstance(node, list):
        for value in node:
            _binary_strings(value)


def complete_for_clients(schema: dict[str, Any]) -> None:
    """What generated clients need beyond FastAPI's document: binary uploads declared as such,
    and redirects described by their ``Location`` header instead of an empty JSON body."""
    _binary_strings(schema.get("components", {}).get("schemas", {}))
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for code, response in operation.get("responses", {}).items():
                if str(code).startswith("3") and str(code) != "304":
                    response.pop("content", None)
                    response.setdefault("headers", {})["Location"] = {
                        "description": "Where the resource is",
                        "schema": {"type": "string", "format": "uri"},
                    }


def install_openapi_security(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the document with security added. FastAPI builds the
    document once (again when routes change); security is added to each new build."""
    build = app.openapi
    secured: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        schema = build()
        if not secured or secured[0] is not schema:
            add_security(schema, app)
            complete_for_clients(schema)
            secured[:] = [schema]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
