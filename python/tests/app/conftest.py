"""Fixtures for the app tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.ingestion.fake_ingestion import FakeIngestionServer, FakeIngestionService, FakeWal

from .backend_under_test import ServeProcess

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
def serve_process(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], ServeProcess]]:
    started: list[ServeProcess] = []

    def start(env: dict[str, str]) -> ServeProcess:
        base = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'junjo.db'}",
            "AUTH_GRPC_LISTEN_ADDRESS": "127.0.0.1:0",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "INGESTION_GRPC_ADDRESS": "127.0.0.1:1",
            "GRPC_SHUTDOWN_GRACE_SECONDS": "1",
        }
        process = ServeProcess({**base, **env}, cwd=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
