"""The PostgreSQL tests find any installed version, and CI never skips them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from .postgres_binaries import find_pg_tool, missing_postgres

if TYPE_CHECKING:
    from pathlib import Path


def test_initdb_is_found_through_pg_config_when_it_is_off_path(tmp_path: Path) -> None:
    pg_config = find_pg_tool("pg_config")
    if pg_config is None:
        missing_postgres("pg_config is not installed")
    # A PATH that holds pg_config and nothing else, as on Debian (initdb lives in
    # /usr/lib/postgresql/<version>/bin).
    only_pg_config = tmp_path / "bin"
    only_pg_config.mkdir()
    (only_pg_config / "pg_config").symlink_to(pg_config)
    initdb = find_pg_tool("initdb", path=str(only_pg_config))
    assert initdb is not None
    assert os.access(initdb, os.X_OK)
    assert not initdb.startswith(str(only_pg_config))


def test_nothing_is_found_without_postgresql(tmp_path: Path) -> None:
    assert find_pg_tool("initdb", path=str(tmp_path)) is None


def test_a_missing_postgresql_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must be tested, not skipped"):
        missing_postgres("no PostgreSQL here")


def test_a_missing_postgresql_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        missing_postgres("no PostgreSQL here")
