"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.postgres_cluster import PostgresCluster, throwaway_cluster
from tests.settings_factory import backend_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from junjo_backend.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top folder (holds buf.yaml, proto/, python/, go-compat-tests/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's one throwaway PostgreSQL cluster (skipped without the binaries, failed
    under CI). Tests take a database of their own from it (`postgres_url`); only a test that
    stops the server starts a cluster of its own (tests/faults/test_postgres_outage.py)."""
    with throwaway_cluster("junjo-pg-") as cluster:
        yield cluster


@pytest.fixture
async def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh, empty database on the session's cluster, for one test."""
    return await postgres.new_database()


@pytest.fixture
def database_path(tmp_path: Path) -> Path:
    """The test's SQLite file (its folder does not exist yet: the backend creates it)."""
    return tmp_path / "data" / "junjo.db"


@pytest.fixture
def database_url(database_path: Path) -> str:
    """The URL of `database_path`."""
    return f"sqlite+aiosqlite:///{database_path}"


@pytest.fixture
def settings_defaults() -> dict[str, object]:
    """What a test package sets on top of the base (its conftest overrides this fixture)."""
    return {}


@pytest.fixture
def make_settings(
    database_url: str, settings_defaults: dict[str, object]
) -> Callable[..., Settings]:
    """Settings on the test's database: the base, the package's defaults, then `overrides`."""

    def build(**overrides: object) -> Settings:
        return backend_settings(database_url, **{**settings_defaults, **overrides})

    return build
