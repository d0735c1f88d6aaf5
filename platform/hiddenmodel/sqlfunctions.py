"""SQL functions as files: each version of each function in ``migrations/sql/<name>/vN.sql``.

A migration that creates or changes a function loads a file by name and version
(:func:`hiddenmodel.migration_helpers.create_function`), so the current definition of every
function is the highest version of its file, readable and diffable beside the earlier ones.
The files hold what PostgreSQL prints for the function (``pg_get_functiondef``), so
``tests/test_sql_functions.py`` can compare the database with them exactly, and
``hiddenmodel sql-functions`` writes a new version from a database whose definition changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text

SQL_DIR = Path(__file__).resolve().parents[2] / "migrations" / "sql"
_VERSION = re.compile(r"^v(\d+)\.sql$")

# Every function of the schema, as PostgreSQL prints it (ours all start with hm_).
_DEFINITIONS = text(
    """
    SELECT p.proname, pg_get_functiondef(p.oid)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'public' AND p.proname LIKE 'hm\\_%'
    ORDER BY p.proname
    """
)


@dataclass(frozen=True)
class FunctionFile:
    name: str
    version: int
    path: Path

    def read(self) -> str:
        return self.path.read_text()


def function_file(name: str, version: int, root: Path = SQL_DIR) -> FunctionFile:
    path = root / name / f"v{version}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"no SQL file for {name} version {version}: {path}")
    return FunctionFile(name, version, path)


def latest_files(root: Path = SQL_DIR) -> dict[str, FunctionFile]:
    """The highest version of every function's file."""
    latest: dict[str, FunctionFile] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        versions = [int(m.group(1)) for f in folder.iterdir() if (m := _VERSION.match(f.name))]
        if versions:
            latest[folder.name] = function_file(folder.name, max(versions), root)
    return latest


def normalized(definition: str) -> str:
    """Line ends and trailing blanks do not count."""
    return "\n".join(line.rstrip() for line in definition.strip().splitlines())


def database_definitions(conn: Connection) -> dict[str, str]:
    return {row[0]: normalized(row[1]) for row in conn.execute(_DEFINITIONS)}


def differences(conn: Connection, root: Path = SQL_DIR) -> dict[str, str]:
    """Functions whose database definition is not their latest file, with why."""
    files = latest_files(root)
    found: dict[str, str] = {}
    for name, definition in database_definitions(conn).items():
        file = files.get(name)
        if file is None:
            found[name] = "no file"
        elif normalized(file.read()) != definition:
            found[name] = f"differs from {file.path.relative_to(root.parent.parent)}"
    for name in files.keys() - database_definitions(conn).keys():
        found[name] = "file of a function the database does not have"
    return found


def write_new_versions(conn: Connection, root: Path = SQL_DIR) -> list[FunctionFile]:
    """Write the database's definition as the next version of each function whose latest
    file differs (or that has none); returns what was written."""
    files = latest_files(root)
    written: list[FunctionFile] = []
    for name, definition in database_definitions(conn).items():
        file = files.get(name)
        if file is not None and normalized(file.read()) == definition:
            continue
        version = file.version + 1 if file else 1
        path = root / name / f"v{version}.sql"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(definition + "\n")
        written.append(FunctionFile(name, version, path))
    return written
