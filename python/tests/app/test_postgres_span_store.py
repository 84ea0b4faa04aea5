"""SPAN_STORE=auto with PostgreSQL: the PostgreSQL store keeps every drained span, and a
replica that does not lead reads them too (through the real app and lifespan)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from harness.waiting import wait_until
from junjo_backend.app import Backend, create_app
from junjo_backend.database import close_engine, create_engine
from tests.ingestion.fake_ingestion import FakeWal, make_resource, make_span

if TYPE_CHECKING:
    from collections.abc import Callable

    from junjo_backend.settings import Settings
    from tests.ingestion.fake_ingestion import FakeIngestionServer

pytestmark = pytest.mark.timeout(180)
SPANS = 300


@pytest.fixture
def wal() -> FakeWal:
    """Spans with ids of their own (the app fixtures' WAL repeats one span)."""
    wal = FakeWal()
    resources = [make_resource(f"pg-svc-{n}").SerializeToString() for n in range(3)]
    for n in range(SPANS):
        wal.append(make_span(f"op-{n}").SerializeToString(), resources[n % 3])
    return wal


async def _stored(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT count(*) FROM spans"))).scalar_one())
    finally:
        await close_engine(engine)


async def test_auto_with_postgresql_stores_every_span_and_a_standby_reads_them(
    make_settings: Callable[..., Settings],
    postgres_url: str,
    ingestion: FakeIngestionServer,  # serving this module's `wal`
) -> None:
    settings = make_settings(
        database_url=postgres_url, ingestion_grpc_address=ingestion.address, span_store="auto"
    )
    assert settings.span_store_kind == "database"
    leader_app = create_app(settings)
    async with LifespanManager(leader_app, startup_timeout=60, shutdown_timeout=30) as leader:
        backend = leader._state["backend"]
        assert isinstance(backend, Backend)
        await wait_until(
            lambda: backend.poller is not None and backend.poller.status.spans_processed == SPANS,
            "the leader drains the WAL",
            limit=120,
        )
        assert await _stored(postgres_url) == SPANS
        # A second replica on the same database stands by, and answers the read routes.
        standby_app = create_app(make_settings(database_url=postgres_url, poller_enabled=False))
        async with (
            LifespanManager(standby_app, startup_timeout=60) as standby,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=standby.app), base_url="http://standby"
            ) as http,
        ):
            names = await http.get("/otel/span-service-names")
            assert names.json() == ["pg-svc-0", "pg-svc-1", "pg-svc-2"]
            roots = await http.get("/otel/service/pg-svc-1/root-spans")
            assert len(roots.json()) == SPANS // 3
