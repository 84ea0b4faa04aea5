"""Fixtures of the store tests: a real SQLite checkpoint database and DuckDB store files."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.store.duckdb_store import DuckDBStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """The poller's SQLite database (the `conn` a store's write runs inside)."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'junjo.db'}")
    await init_schema(engine)
    yield engine
    await close_engine(engine, quiet=True)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[DuckDBStore]:
    """An open store on a new file; closed after the test."""
    store = DuckDBStore(tmp_path / "otel_data.db", converter="thread")
    await store.open()
    yield store
    await store.close()
