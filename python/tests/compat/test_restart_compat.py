"""The peer container restarts in the middle of a drain: our SpanPoller loses nothing."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import grpc
import pytest
from sqlalchemy import select

from harness.waiting import wait_until
from junjo_backend.database import poller_state
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.poller.loop import SpanPoller
from junjo_backend.settings import Settings

from .otlp_spans import bulk_request
from .wire import export_traces

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from harness.peer import PeerPorts
    from junjo_backend.ingestion.spans import SpanRecord

    from .auth_backend import AuthBackend
    from .peer import PeerFleet

pytestmark = pytest.mark.compat

SPANS = 12_000
SPANS_PER_EXPORT = 1_000
POLLER_BATCH = 40  # the poller reads 100 batches per stream: 4,000 records, so 3 streams
DRAIN_BOUND_SECONDS = 120.0  # a bound on waiting, not an expectation of speed


class GatedSink:
    """Records every key it is handed; holds the poller once it has seen `hold_after` keys."""

    def __init__(self, hold_after: int) -> None:
        self.keys: list[bytes] = []
        self.holding = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        self._hold_after = hold_after

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        del conn  # the sink writes nothing of its own
        self.keys.extend(record.key for record in batch)
        if len(self.keys) >= self._hold_after and not self.holding.is_set():
            self.holding.set()
            self._gate.clear()
        await self._gate.wait()

    def release(self) -> None:
        self._gate.set()


def port_refuses(port: int) -> bool:
    """Whether nothing accepts connections on the loopback port any more."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_the_poller_resumes_after_a_peer_restart_and_loses_nothing(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    key = await auth_backend.create_key("compat: restart")
    peer = await peers.launch(peer_ports)
    for first in range(0, SPANS, SPANS_PER_EXPORT):
        outcome = await export_traces(
            peer.public_address, bulk_request(first, SPANS_PER_EXPORT, "restart"), key
        )
        assert outcome.code is grpc.StatusCode.OK, outcome
    async with IngestionClient(peer.internal_address, settings=auth_backend.settings) as reader:
        wal_keys = [record.key for record in await reader.read_spans(None, SPANS + 1)]
    assert len(wal_keys) == SPANS

    settings = Settings.model_validate(
        {
            **auth_backend.settings.model_dump(),
            "ingestion_grpc_address": peer.internal_address,
            "poller_batch_size": POLLER_BATCH,
            "poller_idle_wait_seconds": 0.05,
            "poller_max_backoff_seconds": 0.5,
        }
    )
    sink = GatedSink(hold_after=SPANS // 3)
    client = IngestionClient(settings=settings)
    poller = SpanPoller(client, auth_backend.engine, sink, settings=settings)
    await poller.start()
    try:
        await asyncio.wait_for(sink.holding.wait(), DRAIN_BOUND_SECONDS)
        # The poller is held inside a batch, a third of the way through the WAL. Stop the
        # peer (SIGTERM: graceful stop, then WAL sync and close); once its listeners are
        # closed, let the poller go on: it finishes what was already streamed to it and
        # then finds nobody there until the new container serves.
        stopping = asyncio.create_task(peer.stop())
        await wait_until(
            lambda: port_refuses(peer_ports.internal),
            "the peer to close its port",
            limit=DRAIN_BOUND_SECONDS,
        )
        sink.release()
        assert await stopping == 0  # a clean exit: the WAL was synced and closed
        keys_at_restart = len(sink.keys)
        assert keys_at_restart < SPANS

        await peer.start()  # same ports, same WAL directory
        await peer.wait_serving()
        await wait_until(
            lambda: len(sink.keys) >= SPANS, "the drain to finish", limit=DRAIN_BOUND_SECONDS
        )
        await wait_until(
            lambda: poller.status.last_key == wal_keys[-1],
            "the checkpoint to settle",
            limit=DRAIN_BOUND_SECONDS,
        )
    finally:
        sink.release()
        await poller.stop()
        await client.close()

    assert sink.keys == wal_keys  # every key, in order, each once
    assert poller.status.spans_processed == SPANS
    async with auth_backend.engine.connect() as conn:
        stored = (await conn.execute(select(poller_state.c.last_key))).scalar_one()
    assert bytes(stored) == wal_keys[-1]
