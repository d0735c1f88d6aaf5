"""The import contract of docs/ARCHITECTURE.md, checked on the source with ``ast``.

Every import counts, also those inside functions (a lazy import still makes the API process
load the module when it runs); only the general cycle check looks at module-level imports
alone, as Python does. Inside ``workers`` even a lazy import may not close a cycle: of two
modules, one imports the other, never both. The API app's whole import graph is walked too: it
may load no worker module and no module that makes outgoing webhook requests. Each rule is
also run on a small tree that breaks it, so a checker that stopped seeing violations would
fail here too.

Permissions are checked by dependencies, not in route bodies: no route handler calls
``.require(…)`` (itself or through a helper of its module), and every route of the app that
acts in an organization runs a permission dependency (``tenants.auth.requires``) unless it
declares the scopes its service checks.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.models import Dependant

from hiddenmodel.api.openapi import api_routes, required_permissions
from tenants.auth import (
    JOBS_READ,
    KeyOrgScopeDep,
    ManageMembers,
    OrgScope,
    OrgScopeDep,
    org_scope_from_key,
    org_scope_from_path,
    requires,
)

ROOT = Path(__file__).resolve().parents[1]
# Source roots and the packages under each.
PACKAGES = {"platform": ("hiddenmodel",), ".": ("tenants", "workers", "portal")}

# Model runtimes and image execution libraries: loaded by workers only.
EXECUTION_LIBRARIES = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "cv2"}
# Launchers compose the whole system (they start workers): they may import anything.
LAUNCHERS = ("hiddenmodel.cli", "hiddenmodel.up")
COMPOSITION_ROOT = "hiddenmodel.api.app"
# The modules that make outgoing webhook requests: run by workers, never loaded by the API.
WEBHOOK_SENDERS = ("hiddenmodel.webhooks.delivery",)
# Primitives every layer builds on; they import no domain and no identity code.
PRIMITIVES = (
    "hiddenmodel.settings",
    "hiddenmodel.tenancy",
    "hiddenmodel.db",
    "hiddenmodel.storage",
    "hiddenmodel.redis",
    "hiddenmodel.errors",
    "hiddenmodel.requestid",
    "hiddenmodel.security",
    "hiddenmodel.processes",
)
# What identity and access (``tenants``) sits below.
CORE_DOMAINS = (
    "hiddenmodel.jobs",
    "hiddenmodel.usage",
    "hiddenmodel.billing",
    "hiddenmodel.webhooks",
    "hiddenmodel.retention",
    "hiddenmodel.batches",
    "hiddenmodel.admin",
    "hiddenmodel.api",
)

# Domain packages laid out as docs/ARCHITECTURE.md says ("Where things go"): these files each.
LAYERED_DOMAINS = (
    "hiddenmodel.jobs",
    "hiddenmodel.usage",
    "hiddenmodel.billing",
    "hiddenmodel.webhooks",
    "hiddenmodel.retention",
    "hiddenmodel.batches",
    "hiddenmodel.admin",
)
DOMAIN_FILES = ("schemas.py", "repository.py", "service.py", "router.py")
# What a domain's schemas, service and router may take from SQLAlchemy: sessions and errors.
# Statements (select, text, func, …) are built in its repository.
SQL_FREE_MODULES = ("schemas", "service", "router")
SESSION_AND_ERRORS = ("sqlalchemy.exc", "sqlalchemy.ext.asyncio", "sqlalchemy.orm.Session")
# ``from sqlalchemy.orm import Session`` names the package too; what it takes is checked.
SQL_PACKAGES = ("sqlalchemy.orm",)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    name: str  # what it imports (absolute)
    line: int
    top_level: bool


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for source, packages in PACKAGES.items():
        for package in packages:
            for path in sorted((root / source / package).rglob("*.py")):
                parts = list(path.relative_to(root / source).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    skipped = {
        id(inner) for n in tree.body if _type_checking(n) for inner in ast.walk(n) if inner is not n
    }
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            yield Import(module, name, getattr(node, "lineno", 0), id(node) in top)


def all_imports(root: Path) -> list[Import]:
    return [i for module, path in modules(root).items() for i in imports(module, path)]


def violations(root: Path) -> list[str]:
    """Every broken rule of the contract, one line each."""
    found: list[str] = []
    known = modules(root)
    for i in all_imports(root):
        where = f"{i.module}:{i.line} imports {i.name}"
        launcher = _within(i.module, *LAUNCHERS)
        if i.name.split(".")[0] in EXECUTION_LIBRARIES and not _within(i.module, "workers"):
            found.append(f"{where}: model and image execution code is for workers only")
        if _within(i.name, "workers") and not (_within(i.module, "workers") or launcher):
            found.append(f"{where}: only workers and the launchers import workers")
        if _within(i.name, COMPOSITION_ROOT) and not launcher:
            found.append(f"{where}: nothing but the launchers imports the composition root")
        if _within(i.name, "portal") and not (
            _within(i.module, "portal", COMPOSITION_ROOT) or launcher
        ):
            found.append(f"{where}: the portal is mounted by the app factory, not imported")
        if _within(i.module, "tenants") and _within(
            i.name, *CORE_DOMAINS, *LAUNCHERS, "workers", "portal"
        ):
            found.append(f"{where}: identity and access sits below the core domains")
        if _within(i.module, *PRIMITIVES) and _within(
            i.name, "tenants", *CORE_DOMAINS, *LAUNCHERS, "workers", "portal"
        ):
            found.append(f"{where}: primitives import no domain")
        if _within(i.name, *WEBHOOK_SENDERS) and not _within(i.module, "workers", *WEBHOOK_SENDERS):
            found.append(f"{where}: only workers import the webhook delivery (it makes requests)")
        if (
            i.name.split(".")[0] == "httpx"
            and _within(i.module, "hiddenmodel.webhooks")
            and not _within(i.module, *WEBHOOK_SENDERS)
        ):
            found.append(f"{where}: webhook requests are made by the delivery module only")
        if (
            _within(i.module, *LAYERED_DOMAINS)
            and i.module.rsplit(".", 1)[-1] in SQL_FREE_MODULES
            and i.name.startswith("sqlalchemy.")
            and not _within(i.name, *SESSION_AND_ERRORS)
            and i.name not in SQL_PACKAGES
        ):
            found.append(f"{where}: SQL is written in the domain's repository")
    everything = all_imports(root)
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(known, everything)]
    in_workers = {m: p for m, p in known.items() if _within(m, "workers")}
    found += [
        f"import cycle inside workers: {' -> '.join(c)}"
        for c in cycles(in_workers, everything, top_level_only=False)
    ]
    for module, path in loaded_by(COMPOSITION_ROOT, known, everything).items():
        if _within(module, "workers", *WEBHOOK_SENDERS):
            found.append(f"the API app loads {module} (via {' -> '.join(path)})")
    return found


def loaded_by(start: str, known: dict[str, Path], found: list[Import]) -> dict[str, list[str]]:
    """Every module that loading ``start`` may load, lazy imports included (a package's
    ``__init__`` with each of its modules), with one import path to each."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in found:
        parts = i.name.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            if name in known and name != i.module:
                graph[i.module].add(name)
    if start not in known:
        return {}
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph[node]):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return paths


def cycles(
    known: dict[str, Path], found: list[Import], *, top_level_only: bool = True
) -> list[list[str]]:
    """Import cycles among ``known``; with ``top_level_only=False`` lazy imports count too."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in found:
        if (
            (i.top_level or not top_level_only)
            and i.module in known
            and i.name in known
            and i.name != i.module
        ):
            graph[i.module].add(i.name)
    state: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return loops


def test_the_code_keeps_the_import_contract() -> None:
    assert violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {
        "platform/hiddenmodel/__init__.py": "",
        "tenants/__init__.py": "",
        "workers/__init__.py": "",
        "portal/__init__.py": "",
        **files,
    }.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"platform/hiddenmodel/jobs.py": "def f():\n    import torch\n"},
            "hiddenmodel.jobs:2 imports torch: model and image execution code is for workers",
        ),
        (
            {"portal/views.py": "from workers.celery_app import app\n"},
            "portal.views:1 imports workers.celery_app: only workers and the launchers",
        ),
        (
            {"platform/hiddenmodel/jobs/service.py": "from hiddenmodel.api.app import x\n"},
            "imports hiddenmodel.api.app: nothing but the launchers imports the composition",
        ),
        (
            {"tenants/service.py": "from hiddenmodel.usage import service\n"},
            "tenants.service:1 imports hiddenmodel.usage: identity and access sits below",
        ),
        (
            {"platform/hiddenmodel/db.py": "from tenants import models\n"},
            "hiddenmodel.db:1 imports tenants: primitives import no domain",
        ),
        (
            {"platform/hiddenmodel/usage/service.py": "from sqlalchemy import select, text\n"},
            "hiddenmodel.usage.service:1 imports sqlalchemy.select: SQL is written in the",
        ),
        (
            {"workers/a.py": "import workers.b\n", "workers/b.py": "from workers import a\n"},
            "import cycle: workers.a -> workers.b -> workers.a",
        ),
        (
            {
                "workers/a.py": "import workers.b\n",
                "workers/b.py": "def f():\n    from workers import a\n",
            },
            "import cycle inside workers: workers.a -> workers.b -> workers.a",
        ),
        (
            {"platform/hiddenmodel/batches.py": "from hiddenmodel.webhooks import delivery\n"},
            "hiddenmodel.batches:1 imports hiddenmodel.webhooks.delivery: only workers import",
        ),
        (
            {"platform/hiddenmodel/webhooks/enqueue.py": "def f():\n    import httpx\n"},
            "hiddenmodel.webhooks.enqueue:2 imports httpx: webhook requests are made by the",
        ),
        (
            {
                "platform/hiddenmodel/api/__init__.py": "",
                "platform/hiddenmodel/api/app.py": "from hiddenmodel.jobs import lifecycle\n",
                "platform/hiddenmodel/jobs/__init__.py": "",
                "platform/hiddenmodel/jobs/lifecycle.py": "import hiddenmodel.webhooks.enqueue\n",
                "platform/hiddenmodel/webhooks/__init__.py": "from . import delivery\n",
                "platform/hiddenmodel/webhooks/enqueue.py": "",
                "platform/hiddenmodel/webhooks/delivery.py": "",
            },
            "the API app loads hiddenmodel.webhooks.delivery (via hiddenmodel.api.app -> "
            "hiddenmodel.jobs.lifecycle -> hiddenmodel.webhooks -> hiddenmodel.webhooks.delivery)",
        ),
        (
            {
                "platform/hiddenmodel/api/__init__.py": "",
                "platform/hiddenmodel/api/app.py": "def f():\n    from hiddenmodel import up\n",
                "platform/hiddenmodel/up.py": "import workers.dispatcher\n",
                "workers/dispatcher.py": "",
            },
            "the API app loads workers.dispatcher (via hiddenmodel.api.app -> hiddenmodel.up -> ",
        ),
    ],
)
def test_the_checker_sees_each_kind_of_violation(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    found = violations(_tree(tmp_path, files))
    assert any(expected in line for line in found), found


def test_launchers_and_type_checking_imports_are_allowed(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "platform/hiddenmodel/cli.py": "import workers.dispatcher\nimport hiddenmodel.api.app",
            "platform/hiddenmodel/api/__init__.py": "",
            "platform/hiddenmodel/api/app.py": "import portal\n",
            "workers/run.py": "import torch\n",
            "tenants/auth.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from hiddenmodel.jobs import models\n"
            ),
        },
    )
    assert violations(root) == []


def test_the_architecture_notes_name_files_that_exist() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(
        re.findall(r"`((?:platform|tenants|workers|portal|migrations|tests|bench)/[^`*<]+)`", text)
    )
    assert paths, "docs/ARCHITECTURE.md names no files"
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert missing == [], f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_each_domain_has_the_files_of_its_layers() -> None:
    missing = [
        f"{domain}/{name}"
        for domain in LAYERED_DOMAINS
        for name in DOMAIN_FILES
        if not (ROOT / "platform" / domain.replace(".", "/") / name).exists()
    ]
    assert missing == []


# Methods of a router (or an app) whose decorator makes a function a route handler.
ROUTE_METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "api_route"}
FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def _is_route_handler(function: FunctionNode) -> bool:
    return any(
        isinstance(d, ast.Call)
        and isinstance(d.func, ast.Attribute)
        and d.func.attr in ROUTE_METHODS
        for d in function.decorator_list
    )


def _require_call(
    function: FunctionNode, helpers: dict[str, FunctionNode], seen: set[str]
) -> int | None:
    """The line of a ``.require(…)`` call in ``function`` or in a helper of its module that
    it calls by name, or None."""
    seen.add(function.name)
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr == "require":
            return node.lineno
        called = node.func.id if isinstance(node.func, ast.Name) else ""
        if called in helpers and called not in seen:
            line = _require_call(helpers[called], helpers, seen)
            if line is not None:
                return line
    return None


def permission_violations(root: Path) -> list[str]:
    """Route handlers that check a permission in their body instead of taking the org scope
    through a permission dependency, one line each."""
    found: list[str] = []
    for module, path in modules(root).items():
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = {
            n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        for function in functions.values():
            if not _is_route_handler(function):
                continue
            line = _require_call(function, functions, set())
            if line is not None:
                found.append(
                    f"{module}:{line} {function.name} checks a permission in its body: take "
                    "the scope through a permission dependency (tenants.auth.requires)"
                )
    return found


def test_route_handlers_leave_permissions_to_dependencies() -> None:
    assert permission_violations(ROOT) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "@router.get('/x')\nasync def read(scope):\n    scope.require(READ_ORG)\n",
            "hiddenmodel.things.router:3 read checks a permission in its body",
        ),
        (
            "async def _helper(scope):\n    scope.require(READ_ORG)\n\n\n"
            "def _outer(scope):\n    return _helper(scope)\n\n\n"
            "@router.post('/x', status_code=201)\nasync def write(scope):\n"
            "    return await _outer(scope)\n",
            "hiddenmodel.things.router:2 write checks a permission in its body",
        ),
    ],
)
def test_the_permission_checker_sees_a_check_in_a_route(
    tmp_path: Path, source: str, expected: str
) -> None:
    root = _tree(tmp_path, {"platform/hiddenmodel/things/router.py": source})
    found = permission_violations(root)
    assert any(expected in line for line in found), found


def test_services_and_dependencies_may_check_permissions(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "platform/hiddenmodel/things/service.py": (
                "async def remove(scope, leaving):\n"
                "    if not leaving:\n        scope.require(MANAGE_MEMBERS)\n"
            ),
            "platform/hiddenmodel/things/router.py": (
                "def requires(permission):\n"
                "    async def check(scope):\n        scope.require(permission)\n"
                "    return check\n\n\n"
                "@router.delete('/x')\nasync def remove(scope: ManageMembers):\n"
                "    await service.remove(scope, False)\n"
            ),
        },
    )
    assert permission_violations(root) == []


ORG_SCOPES = {org_scope_from_path, org_scope_from_key}


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def unguarded_org_routes(app: FastAPI) -> list[str]:
    """Routes that act in an organization (run an org scope) with no permission dependency.
    A route whose service makes the check (leaving an organization needs no permission)
    declares the scopes it checks in its ``openapi_extra`` and is not listed."""
    found = []
    for route in api_routes(app):
        calls = set(_calls(route.dependant))
        if not calls & ORG_SCOPES or required_permissions(route):
            continue
        if "x-required-scopes" in (route.openapi_extra or {}):
            continue
        found.append(f"{','.join(sorted(route.methods or ()))} {route.path}")
    return found


def test_routes_in_an_organization_require_a_permission(app: FastAPI) -> None:
    assert unguarded_org_routes(app) == []


def test_the_route_checker_sees_a_route_without_a_permission() -> None:
    router = APIRouter()

    @router.get("/orgs/{org_id}/open")
    async def open_route(scope: OrgScopeDep) -> None: ...

    @router.get("/key/open")
    async def open_key_route(scope: KeyOrgScopeDep) -> None: ...

    @router.get("/orgs/{org_id}/guarded")
    async def guarded(scope: ManageMembers) -> None: ...

    @router.get("/key/guarded")
    async def key_guarded(
        scope: Annotated[OrgScope, Depends(requires(JOBS_READ, key_org=True))],
    ) -> None: ...

    @router.delete("/orgs/{org_id}/self", openapi_extra={"x-required-scopes": ["admin"]})
    async def checked_by_its_service(scope: OrgScopeDep) -> None: ...

    @router.get("/public")
    async def public() -> None: ...

    app = FastAPI()
    app.include_router(router)
    assert unguarded_org_routes(app) == ["GET /orgs/{org_id}/open", "GET /key/open"]
