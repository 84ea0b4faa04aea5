"""Fixtures for the ingestion client, poller and `spans tail` tests.

Everything runs against `FakeIngestionServer` (a real gRPC server on an ephemeral loopback
port, see fake_ingestion.py) and a real SQLite file under tmp_path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from harness.waiting import free_port
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.ingestion.client import IngestionClient

from .fake_ingestion import FakeIngestionServer, FakeIngestionService, FakeWal

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.settings import Settings


@pytest.fixture
def wal() -> FakeWal:
    return FakeWal()


@pytest.fixture
def ingestion_service(wal: FakeWal) -> FakeIngestionService:
    return FakeIngestionService(wal)


@pytest.fixture
async def ingestion_server(
    ingestion_service: FakeIngestionService,
) -> AsyncIterator[FakeIngestionServer]:
    server = FakeIngestionServer(ingestion_service)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def settings_defaults() -> dict[str, object]:
    """Short waits, and the settle window short but on: every test drains through it."""
    return {
        "ingestion_call_timeout_seconds": 10.0,
        "ingestion_retry_deadline_seconds": 10.0,
        "poller_batch_size": 100,
        "poller_idle_wait_seconds": 0.05,
        "poller_max_backoff_seconds": 0.2,
        "poller_settle_seconds": 0.05,
        "grpc_shutdown_grace_seconds": 5.0,
    }


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], ingestion_server: FakeIngestionServer
) -> Settings:
    return make_settings(ingestion_grpc_address=ingestion_server.address)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[IngestionClient]:
    async with IngestionClient(settings=settings) as ingestion_client:
        yield ingestion_client


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    database = create_engine(database_url)
    await init_schema(database)
    try:
        yield database
    finally:
        await close_engine(database)


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    return free_port()
