"""SPAN_STORE and its companions: what each value resolves to, and the refused combinations.

The refusals go through the real CLI (a subprocess): exit 2 and one `error:` line naming
SPAN_STORE, before anything is created.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from junjo_backend.settings import Settings
from junjo_backend.store_wiring import build_span_store, duckdb_file

from .test_operator_errors import first_error_line, run_cli

_POSTGRES = "postgresql://junjo:s3cret-pw@127.0.0.1:1/junjo"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SPAN_STORE": "duckdb", "DATABASE_URL": _POSTGRES},
            (
                "error: SPAN_STORE: duckdb cannot go with a PostgreSQL DATABASE_URL: replicas "
                "fail over between hosts and a DuckDB file cannot follow them"
            ),
        ),
        (
            {"SPAN_STORE": "database"},
            "error: SPAN_STORE: database needs a PostgreSQL DATABASE_URL",
        ),
        ({"SPAN_STORE": "parquet"}, "error: SPAN_STORE: Input should be 'auto', 'duckdb'"),
        (
            {"SPAN_STORE_DUCKDB_MEMORY_LIMIT": "lots"},
            "error: SPAN_STORE_DUCKDB_MEMORY_LIMIT: expected a size such as 256MB",
        ),
        (
            {"TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS": "-1"},
            "error: TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS: Input should be greater than or equal",
        ),
    ],
)
@pytest.mark.parametrize("command", [("serve",), ("api-keys", "list")])
def test_a_refused_span_store_is_one_line_and_exit_2(
    tmp_path: Path, env: dict[str, str], expected: str, command: tuple[str, ...]
) -> None:
    result = run_cli(tmp_path, *command, env=env)
    assert result.returncode == 2, result.stderr
    line = first_error_line(result)
    assert line.startswith(expected), line
    assert "s3cret-pw" not in result.stderr
    assert not (tmp_path / "data").exists()


def _settings(**values: object) -> Settings:
    """Settings from `values` and the defaults only (no environment, no .env)."""
    return Settings.model_validate(values)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({}, "duckdb"),
        ({"span_store": "AUTO"}, "duckdb"),
        ({"database_url": _POSTGRES}, "database"),
        ({"span_store": "database", "database_url": _POSTGRES}, "database"),
        ({"span_store": "Duckdb"}, "duckdb"),
        ({"span_store": "none"}, "none"),
        ({"span_store": "none", "database_url": _POSTGRES}, "none"),
    ],
)
def test_what_span_store_resolves_to(values: dict[str, object], kind: str) -> None:
    assert _settings(**values).span_store_kind == kind


def test_the_duckdb_file_is_beside_the_sqlite_database_unless_absolute(tmp_path: Path) -> None:
    beside = _settings(database_url=f"sqlite:///{tmp_path / 'db' / 'junjo.db'}")
    assert duckdb_file(beside) == tmp_path / "db" / "otel_data.db"
    relative = _settings(
        database_url=f"sqlite:///{tmp_path / 'junjo.db'}", span_store_duckdb_path="spans/x.db"
    )
    assert duckdb_file(relative) == tmp_path / "spans" / "x.db"
    absolute = _settings(span_store_duckdb_path=str(tmp_path / "elsewhere.db"))
    assert duckdb_file(absolute) == tmp_path / "elsewhere.db"
    # The default database URL is relative to the working folder, and so is its folder.
    assert duckdb_file(_settings()) == Path.cwd() / "data" / "otel_data.db"


def test_none_builds_no_store() -> None:
    choice = build_span_store(_settings(span_store="none"))
    assert (choice.kind, choice.store, choice.location) == ("none", None, None)
