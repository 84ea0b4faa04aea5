"""The span store wired into the poller, against the real Go peer (the binary of `make peer`).

`GoWal` is a WAL directory the peer serves, filled with `walseed` while the peer is
stopped; `drain` runs a real `SpanPoller` with a real `DuckDBStore` until it has passed a
key (store_files.py reads the file afterwards).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from harness.peer import PEER_BINARY, Peer, PeerPorts
from harness.waiting import free_ports, wait_until
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.poller.checkpoint import load_checkpoint, save_checkpoint
from junjo_backend.poller.loop import SpanPoller
from junjo_backend.settings import Settings
from junjo_backend.store.duckdb_store import DuckDBStore

from .store_files import Seeded, junjo_traces

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

DRAIN_LIMIT_SECONDS = 120.0


@dataclass(slots=True)
class GoWal:
    """The Go peer serving a WAL directory, and an auth server of ours for its readiness check."""

    folder: Path
    peer: Peer
    seeded: list[Seeded] = field(default_factory=list)

    @property
    def wal_dir(self) -> Path:
        return self.peer.wal_dir

    @property
    def address(self) -> str:
        """Where ReadSpans is served."""
        return self.peer.internal_address

    @property
    def total(self) -> int:
        return sum(seeded.count for seeded in self.seeded)

    @property
    def last_key(self) -> bytes:
        return self.seeded[-1].last_key

    async def add_traces(self, traces: int) -> Seeded:
        """Stop the peer, add Junjo-shaped traces, start it again."""
        await asyncio.to_thread(self.peer.stop)
        seeded = await asyncio.to_thread(junjo_traces, self.wal_dir, traces)
        self.seeded.append(seeded)
        await asyncio.to_thread(self.peer.start)
        await asyncio.to_thread(self.peer.wait_serving)
        return seeded

    def settings(self, **overrides: object) -> Settings:
        """A poller's settings against this peer, with a SQLite file in the folder."""
        values: dict[str, object] = {
            "database_url": f"sqlite+aiosqlite:///{self.folder / 'junjo.db'}",
            "ingestion_grpc_address": self.address,
            "poller_idle_wait_seconds": 0.05,
            "poller_max_backoff_seconds": 0.2,
            "poller_settle_seconds": 0.05,
            "poller_leader_retry_seconds": 0.2,
            "poller_batch_size": 1000,
        }
        return Settings.model_validate(values | overrides)


@pytest.fixture
async def go_wal(tmp_path: Path) -> AsyncIterator[GoWal]:
    """The Go peer (binary) on an empty WAL; our auth server answers its readiness check."""
    if not PEER_BINARY.exists():
        raise AssertionError(f"{PEER_BINARY} is missing: run `make peer`")
    auth_settings = Settings.model_validate(
        {
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
            "auth_grpc_listen_address": "127.0.0.1:0",
        }
    )
    auth_engine = create_engine(auth_settings.database_url)
    await init_schema(auth_engine)
    auth = AuthServer(auth_settings, auth_engine)
    await auth.start()
    public, internal = free_ports(2)
    ports = PeerPorts(public, internal, backend=int(auth.address.rsplit(":", 1)[1]))
    peer = Peer(ports, tmp_path / "wal", log_level="info")
    try:
        await asyncio.to_thread(peer.start)
        await asyncio.to_thread(peer.wait_serving)
        yield GoWal(tmp_path, peer)
    finally:
        await asyncio.to_thread(peer.stop)
        await auth.stop(0)
        await close_engine(auth_engine)


async def drain(settings: Settings, store_path: Path, until: bytes) -> int:
    """A poller with a DuckDB store at `store_path`, from start-up until its checkpoint is
    `until`; the spans it processed (handed to the store and checkpointed)."""
    engine = create_engine(settings.database_url)
    await init_schema(engine)
    store = DuckDBStore(store_path)
    try:
        async with IngestionClient(settings=settings) as client:
            poller = SpanPoller(client, engine, settings=settings, store=store)
            await poller.start()
            try:
                await wait_until(
                    lambda: poller.status.last_key == until and poller.status.caught_up is True,
                    f"the poller reaches {until.hex()}",
                    limit=DRAIN_LIMIT_SECONDS,
                )
            finally:
                await poller.stop()
            processed = poller.status.spans_processed
    finally:
        await close_engine(engine)
    return processed


async def read_checkpoint(settings: Settings) -> bytes | None:
    engine = create_engine(settings.database_url, create_missing=False)
    try:
        async with engine.connect() as conn:
            return await load_checkpoint(conn)
    finally:
        await close_engine(engine)


async def write_checkpoint(settings: Settings, key: bytes) -> None:
    """Move the SQLite checkpoint (as a restored backup would)."""
    engine = create_engine(settings.database_url, create_missing=False)
    try:
        async with engine.begin() as conn:
            await save_checkpoint(conn, key)
    finally:
        await close_engine(engine)


async def wal_keys(settings: Settings, count: int) -> list[bytes]:
    """The first `count` keys of the WAL."""
    async with IngestionClient(settings=settings) as client:
        return [record.key for record in await client.read_spans(None, count)]
