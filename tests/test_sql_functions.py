"""The SQL functions: the database holds exactly the latest file of each, and PL/pgSQL passes
plpgsql_check."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text

from hiddenmodel import sqlfunctions
from hiddenmodel.settings import get_settings
from tests.conftest import superuser_url


def _owner_engine():  # type: ignore[no-untyped-def]
    return create_engine(get_settings().database_owner_url, poolclass=pool.NullPool)


def test_every_function_is_its_latest_file() -> None:
    engine = _owner_engine()
    with engine.connect() as conn:
        differences = sqlfunctions.differences(conn)
        names = set(sqlfunctions.database_definitions(conn))
    engine.dispose()
    assert names, "no hm_ functions found"
    assert differences == {}, (
        "run `hiddenmodel sql-functions --write` against a migrated database, then load the "
        f"new version in a migration: {differences}"
    )


def test_a_changed_definition_is_seen_and_written_as_the_next_version(tmp_path: Path) -> None:
    root = tmp_path / "sql"
    shutil.copytree(sqlfunctions.SQL_DIR, root)
    latest = sqlfunctions.latest_files(root)["hm_usage_events_due"]
    latest.path.write_text(latest.read().replace("LIMIT p_limit", "LIMIT p_limit + 1"))
    (root / "hm_gone").mkdir()
    (root / "hm_gone" / "v1.sql").write_text("-- a function the database lost\n")
    engine = _owner_engine()
    with engine.connect() as conn:
        found = sqlfunctions.differences(conn, root)
        assert set(found) == {"hm_usage_events_due", "hm_gone"}
        written = sqlfunctions.write_new_versions(conn, root)
        assert [(f.name, f.version) for f in written] == [
            ("hm_usage_events_due", latest.version + 1)
        ]
        assert set(sqlfunctions.differences(conn, root)) == {"hm_gone"}
    engine.dispose()
    with pytest.raises(FileNotFoundError, match="hm_usage_events_due version 99"):
        sqlfunctions.function_file("hm_usage_events_due", 99, root)


def test_plpgsql_functions_pass_plpgsql_check() -> None:
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        available = conn.scalar(
            text("SELECT count(*) FROM pg_available_extensions WHERE name = 'plpgsql_check'")
        )
        if not available:
            if os.environ.get("CI"):
                pytest.fail("plpgsql_check is not installed (scripts/test installs it)")
            pytest.skip(
                "plpgsql_check is not installed: apt-get install postgresql-NN-plpgsql-check"
            )
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS plpgsql_check"))
        conn.commit()
        functions = (
            conn.execute(
                text(
                    """
                SELECT p.oid::regprocedure::text
                FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                JOIN pg_language l ON l.oid = p.prolang
                WHERE n.nspname = 'public' AND p.proname LIKE 'hm\\_%' AND l.lanname = 'plpgsql'
                ORDER BY 1
                """
                )
            )
            .scalars()
            .all()
        )
        assert functions, "no PL/pgSQL functions found"
        # A trigger function is checked against the table its trigger is on.
        trigger_tables: dict[str, str] = {
            f: table
            for f, table in conn.execute(
                text(
                    "SELECT DISTINCT ON (t.tgfoid) t.tgfoid::regprocedure::text, "
                    "t.tgrelid::regclass::text FROM pg_trigger t "
                    "JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.proname LIKE 'hm\\_%'"
                )
            ).tuples()
        }
        found = {
            f: conn.execute(
                text(
                    "SELECT level, message, lineno FROM plpgsql_check_function_tb("
                    "CAST(:f AS regprocedure), coalesce(CAST(:rel AS regclass), 0), "
                    "extra_warnings => true)"
                ),
                {"f": f, "rel": trigger_tables.get(f)},
            ).all()
            for f in functions
        }
    engine.dispose()
    problems = {f: rows for f, rows in found.items() if rows}
    assert problems == {}, problems


def test_the_command_line_reports_no_difference() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "hiddenmodel.cli", "sql-functions"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
