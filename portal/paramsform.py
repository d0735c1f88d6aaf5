"""Form fields generated from an operation's params JSON schema (what GET /v1/operations
publishes), and the posted fields read back into params.

Nothing here validates: an empty field is left out (the operation's default applies), a number
that does not parse is passed on as typed, and the operation's own params model decides, as it
does for the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData

from hiddenmodel.jobs.operations import Operation


@dataclass(frozen=True)
class ParamField:
    """One input of an operation's fieldset."""

    operation: str
    name: str
    label: str
    kind: str  # "number", "integer", "boolean", "choice" or "text"
    description: str | None
    default: Any
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None

    @property
    def field(self) -> str:
        """The form field's name, unique across operations."""
        return f"params.{self.operation}.{self.name}"

    @property
    def id(self) -> str:
        return f"p-{self.operation}-{self.name}"

    @property
    def step(self) -> str:
        return "1" if self.kind == "integer" else "any"


def _plain(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a value that may also be null (``int | None``): the value's."""
    choices = schema.get("anyOf")
    if not choices:
        return schema
    others = [c for c in choices if c.get("type") != "null"]
    return others[0] if len(others) == 1 else {}


def fields(op: Operation) -> list[ParamField]:
    """The operation's params as form inputs, in the schema's order."""
    schema = op.params_model.model_json_schema()
    out: list[ParamField] = []
    for name, prop in schema.get("properties", {}).items():
        inner = _plain(prop)
        if "enum" in inner:
            kind = "choice"
        elif inner.get("type") in ("integer", "number", "boolean"):
            kind = str(inner["type"])
        else:
            kind = "text"
        minimum = inner.get("minimum", inner.get("exclusiveMinimum"))
        maximum = inner.get("maximum", inner.get("exclusiveMaximum"))
        out.append(
            ParamField(
                operation=op.name,
                name=name,
                label=prop.get("title") or name,
                kind=kind,
                description=prop.get("description") or inner.get("description"),
                default=prop.get("default"),
                options=tuple(str(v) for v in inner.get("enum", ())),
                minimum=minimum,
                maximum=maximum,
                pattern=inner.get("pattern"),
            )
        )
    return out


def _number(raw: str, kind: str) -> int | float | str:
    try:
        return int(raw) if kind == "integer" else float(raw)
    except ValueError:
        return raw


def read(op: Operation, form: FormData) -> dict[str, Any]:
    """The params the form's fieldset of ``op`` spells; fields left empty are omitted."""
    params: dict[str, Any] = {}
    for f in fields(op):
        if f.kind == "boolean":
            params[f.name] = form.get(f.field) == "true"
            continue
        raw = form.get(f.field)
        value = raw.strip() if isinstance(raw, str) else ""
        if not value:
            continue
        params[f.name] = _number(value, f.kind) if f.kind in ("integer", "number") else value
    return params


def values(op: Operation, form: FormData | None) -> dict[str, str]:
    """What each input shows: what was posted (to correct it), else the default."""
    shown: dict[str, str] = {}
    for f in fields(op):
        if form is not None:
            raw = form.get(f.field)
            shown[f.name] = raw if isinstance(raw, str) else ""
        elif f.kind == "boolean":
            shown[f.name] = "true" if f.default else ""
        else:
            shown[f.name] = "" if f.default is None else str(f.default)
    return shown
