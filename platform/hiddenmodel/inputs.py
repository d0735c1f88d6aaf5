"""Input normalisation: the text and JSON every request may bring, checked before any of it
reaches the database.

PostgreSQL refuses a NUL in ``text`` and ``jsonb`` (the driver raises, the request would end
in a 500), and a lone surrogate cannot be encoded at all. Other control characters are stored
but corrupt logs, CSV exports and e-mails. Names and slugs are shown to other people (portal,
e-mails, invoices): a right-to-left override or an invisible character there makes one name
look like another, so they are refused too.

Three entry points share the rules here:

* :class:`RequestModel`, the base of every request body schema: a validator on every field
  walks strings, lists and dicts (keys too), so a new field cannot escape;
* :data:`Name`, :data:`Slug` and :data:`FormText`, annotated types for names, slugs and
  multipart form fields;
* :mod:`hiddenmodel.inputguard`, which checks path, query string and urlencoded form posts
  (the login form, the portal's forms) for every route at once.

JSON documents that arrive as text (a job's ``params``, a Stripe event) are parsed by
:func:`parse_json`, with a size and nesting limit checked before the parser recurses.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BaseModel, ValidationInfo, field_validator

RESERVED_SLUGS: Final = frozenset(
    {
        "admin",
        "administrator",
        "api",
        "app",
        "assets",
        "auth",
        "billing",
        "dashboard",
        "docs",
        "docs-assets",
        "help",
        "hiddenmodel",
        "login",
        "logout",
        "mail",
        "metrics",
        "new",
        "openapi",
        "operator",
        "operators",
        "portal",
        "redoc",
        "root",
        "security",
        "settings",
        "signin",
        "signup",
        "static",
        "status",
        "support",
        "system",
        "v1",
        "webhooks",
        "www",
    }
)
"""Slugs that name, or could pass for, the platform's own pages, hosts and staff."""

MAX_JSON_DEPTH: Final = 32
MAX_PARAMS_BYTES: Final = 16 * 1024


class InputRefused(ValueError):
    """A value with characters that are never accepted; the message names the character."""


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


# Unicode's control characters (category Cc: C0, DEL, C1) but tab, line feed and carriage
# return, and the surrogate range (Cs), which no UTF-8 text can hold.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as free text, or None: NUL and other control characters
    (tab, line feed and carriage return excepted), and lone surrogates."""
    found = _NOT_TEXT.search(value)
    if found is None:
        return None
    char = found.group()
    if unicodedata.category(char) == "Cs":
        return f"unpaired surrogate {_describe(char)} is not allowed"
    return f"control character {_describe(char)} is not allowed"


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a name, or None: besides :func:`text_problem`, line breaks and
    tabs, and the invisible format characters (bidi overrides, embeddings and isolates,
    zero-width spaces and joiners, soft hyphens, byte-order marks) that let one name pass for
    another."""
    for char in value:
        category = unicodedata.category(char)
        if category in ("Cc", "Cs"):
            return f"control character {_describe(char)} is not allowed"
        if category in ("Cf", "Zl", "Zp", "Co"):
            return f"invisible or direction-changing character {_describe(char)} is not allowed"
    return None


def check_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise InputRefused(problem)
    return value


def check_name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise InputRefused(problem)
    return value


def check_slug(value: str) -> str:
    check_name(value)
    if value.lower() in RESERVED_SLUGS:
        raise InputRefused(f"'{value}' is reserved")
    return value


def check_value(value: Any, depth: int = 0) -> None:
    """Every string inside ``value`` (dict keys included) checked as free text."""
    if depth > MAX_JSON_DEPTH:
        raise InputRefused(f"nested more than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                check_text(key)
            check_value(item, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            check_value(item, depth + 1)


Name = Annotated[str, AfterValidator(check_name)]
"""A name people see (organization, API key, user, batch, plan)."""
Slug = Annotated[str, AfterValidator(check_slug)]
"""An organization's slug: a name, and none of :data:`RESERVED_SLUGS`."""
FormText = Annotated[str, AfterValidator(check_text)]
"""A multipart form field (the JSON bodies are covered by :class:`RequestModel`)."""


class RequestModel(BaseModel):
    """Base of every request body: no field holds a string the database cannot store.

    A wildcard validator rather than a field type, so a field added later, of any type that
    holds strings (``str``, ``list[str]``, ``dict[str, Any]``), is covered without anyone
    remembering to; ``tests/test_input_hardening.py`` walks every request schema to prove it.
    """

    @field_validator("*", mode="after")
    @classmethod
    def _storable_text(cls, value: Any, info: ValidationInfo) -> Any:
        check_value(value)
        return value


def json_depth(raw: str | bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it
    (the standard parser recurses once per level and would overflow the stack first)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class JsonRefused(ValueError):
    """A JSON text refused before or while parsing; the message says why."""


def parse_json(
    raw: str | bytes, *, max_bytes: int = MAX_PARAMS_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse JSON text within a size and nesting limit, with every string in it storable."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise JsonRefused(f"larger than {max_bytes} bytes")
    if json_depth(raw) > max_depth:
        raise JsonRefused(f"nested more than {max_depth} levels")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise JsonRefused("not valid JSON") from exc
    try:
        check_value(value)
    except InputRefused as exc:
        raise JsonRefused(str(exc)) from exc
    return value
