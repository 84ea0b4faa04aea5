"""The settle window against an ingestion-service whose clock is far from ours.

The in-process ingestion server stamps keys with a clock `skew` seconds from this host's
(keys pinned to `time.time() + skew`), which is how a skewed host's keys look to the poller.
Entries are committed late, behind newer keys, within the window of their key's time, as
concurrent OTLP requests are on the Go side (docs/design/settle-window.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from harness.waiting import wait_until
from junjo_backend.ingestion.spans import ulid_millis
from junjo_backend.poller.loop import SpanPoller

from .fake_ingestion import make_resource, make_span
from .test_poller import RecordingSink

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.client import IngestionClient
    from junjo_backend.settings import Settings

    from .fake_ingestion import FakeWal

pytestmark = pytest.mark.timeout(120)

SETTLE_SECONDS = 0.5
LATE_SECONDS = 0.2  # each late entry commits this long after a newer key, within the window
SKEW_SECONDS = 5.0
ROUNDS = 20


@pytest.fixture
async def poller(
    client: IngestionClient, engine: AsyncEngine, settings: Settings
) -> AsyncIterator[SpanPoller]:
    sink = RecordingSink()
    poller = SpanPoller(
        client,
        engine,
        sink,
        settings=settings.model_copy(update={"poller_settle_seconds": SETTLE_SECONDS}),
    )
    await poller.start()
    yield poller
    await poller.stop()


async def _ingest_with_late_commits(wal: FakeWal, skew: float) -> list[bytes]:
    """ROUNDS times: a key is taken, a newer entry commits, the first commits LATE_SECONDS on."""
    span, resource = make_span("op").SerializeToString(), make_resource("svc").SerializeToString()
    late: list[asyncio.Task[bytes]] = []
    keys: list[bytes] = []

    async def commit_late(key: bytes) -> bytes:
        await asyncio.sleep(LATE_SECONDS)
        return wal.append(span, resource, key=key)

    for _ in range(ROUNDS):
        stamp = int((time.time() + skew) * 1000)
        reserved = wal.reserve_key(stamp)
        keys.append(wal.append(span, resource, ms=stamp))
        late.append(asyncio.create_task(commit_late(reserved)))
        await asyncio.sleep(0.05)
    keys.extend(await asyncio.gather(*late))
    return sorted(keys)


@pytest.mark.parametrize("skew", [-SKEW_SECONDS, SKEW_SECONDS], ids=["this-clock-ahead", "behind"])
async def test_late_commits_within_the_window_are_delivered_whatever_the_skew(
    poller: SpanPoller, wal: FakeWal, skew: float
) -> None:
    keys = await _ingest_with_late_commits(wal, skew)
    sink = poller.sink
    assert isinstance(sink, RecordingSink)
    await wait_until(lambda: poller.status.last_key == keys[-1] and poller.status.caught_up is True)
    # Every key once, in order: a read that had moved past a late key would have lost it.
    assert sink.keys == keys
    assert poller.status.entries_skipped == 0
    if skew > 0:
        # This host's clock is behind the keys: they settled by what the poller saw, not by
        # this clock, which has not even reached the newest key's time.
        assert time.time() * 1000 < ulid_millis(keys[-1])


async def test_a_look_ahead_past_its_held_records_loses_nothing(
    client: IngestionClient,
    engine: AsyncEngine,
    settings: Settings,
    wal: FakeWal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 entries a millisecond apart, 20 s old. The first read knows no key yet, so it
    # reads ahead, keeping only 10 unsettled records and then only looking at keys, until
    # those it did not keep have settled (a key W newer was read: at least 500 on, which is
    # past the first chunk of at most 256).
    monkeypatch.setattr("junjo_backend.poller.loop._LOOK_AHEAD_HELD_RECORDS", 10)
    base = int(time.time() * 1000) - 20_000
    keys = [key for n in range(2000) for key in wal.seed(1, ms=base + n)]
    sink = RecordingSink()
    poller = SpanPoller(
        client,
        engine,
        sink,
        settings=settings.model_copy(update={"poller_settle_seconds": SETTLE_SECONDS}),
    )
    await poller.start()
    try:
        await wait_until(lambda: poller.status.last_key == keys[-1])
    finally:
        await poller.stop()
    assert sink.keys == keys
