"""Fixtures for the app tests."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import pytest

from tests.ingestion.fake_ingestion import FakeIngestionServer, FakeIngestionService, FakeWal
from tests.serve_process import ServeProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path


@pytest.fixture
def wal() -> FakeWal:
    """The ingestion-service's WAL, holding 250 spans for the backend to drain."""
    wal = FakeWal()
    wal.seed(250)
    return wal


@pytest.fixture
async def ingestion(wal: FakeWal) -> AsyncIterator[FakeIngestionServer]:
    """A real ReadSpans server over `wal`; tests may stop it and start it on the same port."""
    async with FakeIngestionServer(FakeIngestionService(wal)) as server:
        yield server


@pytest.fixture
def settings_defaults() -> dict[str, object]:
    """Short waits for a backend on loopback ephemeral ports."""
    return {
        "grpc_shutdown_grace_seconds": 0.5,
        "poller_idle_wait_seconds": 0.05,
        "poller_max_backoff_seconds": 0.2,
        "health_probe_timeout_seconds": 1.0,
    }


@pytest.fixture
def serve_process(
    tmp_path: Path, database_url: str
) -> Iterator[Callable[[dict[str, str]], ServeProcess]]:
    """Start `serve` (JSON logs, on the test's SQLite file) with `env` on top; killed after."""
    started: list[ServeProcess] = []
    names = itertools.count()

    def start(env: dict[str, str]) -> ServeProcess:
        process = ServeProcess(
            {"DATABASE_URL": database_url, "LOG_FORMAT": "json", **env},
            cwd=tmp_path,
            output=lambda name: tmp_path / f"{name}-{next(names)}.log",
        )
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.close()
