"""The ORM models and the migrations describe the same tables and columns.

Migrations are the only source of schema; the models are how code reads it. Indexes and
constraints live in migrations only, so the comparison covers tables, columns, types and
nullability.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

import hiddenmodel.registry  # noqa: F401 - every mapped table joins the metadata
from hiddenmodel.db import Base
from tests.conftest import superuser_url

IGNORED = {"add_index", "remove_index", "add_constraint", "remove_constraint"}


def _flatten(diff: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for item in diff:
        out += item if isinstance(item, list) else [item]
    return out


def test_models_match_the_migrated_schema() -> None:
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_name": _skip_alembic}
        )
        diff = _flatten(compare_metadata(context, Base.metadata))
    engine.dispose()
    drift = [d for d in diff if d[0] not in IGNORED]
    assert drift == [], "\n".join(str(d)[:300] for d in drift)


def _skip_alembic(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name == "alembic_version")
