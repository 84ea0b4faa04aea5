"""SpanPoller against the in-process ingestion server and a real SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Column, LargeBinary, MetaData, Table, insert, select, text

from harness.waiting import wait_until
from junjo_backend.ingestion.client import MAX_BATCH_SIZE, IngestionClient
from junjo_backend.ingestion.spans import ulid_millis
from junjo_backend.poller.checkpoint import load_checkpoint, save_checkpoint
from junjo_backend.poller.leadership import PollerLeadership
from junjo_backend.poller.loop import PollerStatus, SpanPoller
from junjo_backend.poller.sinks import ServiceTally

from .fake_ingestion import (
    FakeIngestionServer,
    FakeIngestionService,
    FakeWal,
    make_resource,
    make_span,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.settings import Settings

# A table of the sink's own, to show that its writes share the checkpoint's transaction.
sink_metadata = MetaData()
delivered_table = Table("delivered", sink_metadata, Column("key", LargeBinary, primary_key=True))


class RecordingSink:
    """Remembers every batch; can fail on chosen calls after writing, or hold a batch."""

    def __init__(self, *, fail_on_calls: Sequence[int] = (), write: bool = False) -> None:
        self.batches: list[list[bytes]] = []
        self.calls = 0
        self.fail_on_calls = set(fail_on_calls)
        self.write = write
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    @property
    def keys(self) -> list[bytes]:
        return [key for batch in self.batches for key in batch]

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        self.calls += 1
        keys = [record.key for record in batch]
        if self.write:
            await conn.execute(insert(delivered_table), [{"key": key} for key in keys])
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        if self.calls in self.fail_on_calls:
            raise RuntimeError(f"sink failure on call {self.calls}")
        self.batches.append(keys)


async def checkpoint_in(engine: AsyncEngine) -> bytes | None:
    async with engine.connect() as conn:
        return await load_checkpoint(conn)


async def caught_up_at(poller: SpanPoller, key: bytes) -> None:
    await wait_until(lambda: poller.status.last_key == key and poller.status.caught_up is True)


@pytest.fixture
async def make_poller(
    client: IngestionClient, engine: AsyncEngine, settings: Settings
) -> AsyncGenerator[Callable[..., SpanPoller], None]:
    pollers: list[SpanPoller] = []

    def build(sink: RecordingSink | None = None, **overrides: object) -> SpanPoller:
        poller_settings = settings.model_copy(update=overrides)
        poller = SpanPoller(client, engine, sink, settings=poller_settings)
        pollers.append(poller)
        return poller

    yield build
    for poller in pollers:
        await poller.stop()


async def test_drains_the_wal_in_order_and_checkpoints(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    # Stamped a second ago, so all have settled and the batches are whole.
    keys = wal.seed(1050, ms=int(time.time() * 1000) - 1000)
    sink = RecordingSink()
    poller = make_poller(sink)
    assert poller.status == PollerStatus(
        enabled=True,
        running=False,
        caught_up=None,  # a standby does not know
        backlog_age_seconds=None,
        last_key=None,
        last_key_received_at=None,
        spans_processed=0,
        batches_committed=0,
        entries_skipped=0,
        last_error=None,
        role="standby",  # until it has taken leadership (one replica drains)
    )

    await poller.start()
    await caught_up_at(poller, keys[-1])

    assert sink.keys == keys
    assert [len(batch) for batch in sink.batches] == [100] * 10 + [50]
    assert await checkpoint_in(engine) == keys[-1]
    status = poller.status
    assert status.running
    assert status.spans_processed == 1050
    assert status.batches_committed == 11
    assert status.entries_skipped == 0
    assert status.last_error is None
    # Caught up: no backlog, however old the last span is.
    assert status.caught_up
    assert status.backlog_age_seconds == 0
    assert status.last_key_received_at is not None
    assert status.last_key_received_at.timestamp() == ulid_millis(keys[-1]) / 1000

    # New spans are picked up after the idle wait.
    more = wal.seed(5)
    await caught_up_at(poller, more[-1])
    assert sink.keys == keys + more


class PreparingSink(RecordingSink):
    """A sink that converts ahead, as the store sink does: it hears of each next batch."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[list[bytes]] = []
        self.events: list[tuple[str, bytes]] = []

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        self.prepared.append([record.key for record in batch])
        self.events.append(("prepare", batch[0].key))

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        self.events.append(("handle", batch[0].key))
        await super().handle(batch, conn)


async def test_a_sink_that_converts_ahead_hears_of_each_next_batch_before_this_one_commits(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    keys = wal.seed(1050, ms=int(time.time() * 1000) - 1000)
    sink = PreparingSink()
    poller = make_poller(sink)
    await poller.start()
    await caught_up_at(poller, keys[-1])
    # Every record once, in order, in whole batches; the checkpoint at the last.
    assert sink.keys == keys
    assert [len(batch) for batch in sink.batches] == [100] * 10 + [50]
    assert await checkpoint_in(engine) == keys[-1]
    # Each batch but the first was named, whole, before the batch ahead of it was handed over.
    assert sink.prepared == sink.batches[1:]
    for before, after in itertools.pairwise(sink.batches):
        assert sink.events.index(("prepare", after[0])) < sink.events.index(("handle", before[0]))


async def test_resumes_after_the_stored_checkpoint(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    keys = wal.seed(30)
    async with engine.begin() as conn:
        await save_checkpoint(conn, keys[9])
    sink = RecordingSink()
    poller = make_poller(sink)

    await poller.start()
    assert poller.status.last_key == keys[9]
    await caught_up_at(poller, keys[-1])

    assert sink.keys == keys[10:]


async def test_a_failing_sink_leaves_the_checkpoint_and_its_writes_rolled_back(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(sink_metadata.create_all)
    # Stamped a second ago, so all have settled and the batches are whole.
    keys = wal.seed(350, ms=int(time.time() * 1000) - 1000)
    # Calls 2 and 3 write their batch, then fail: neither the rows nor the checkpoint stay.
    sink = RecordingSink(fail_on_calls=(2, 3), write=True)
    poller = make_poller(sink)

    await poller.start()
    await caught_up_at(poller, keys[-1])

    # The failed batch was delivered again, and the table holds each key exactly once.
    assert sink.keys == keys
    assert sink.calls == 4 + 2
    async with engine.connect() as conn:
        stored = (await conn.execute(select(delivered_table.c.key))).scalars().all()
    assert sorted(stored) == keys
    assert poller.status.last_error is None  # cleared by the next success


async def test_sink_error_is_reported_while_retrying(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    wal.seed(10)
    sink = RecordingSink(fail_on_calls=range(1, 10_000))
    poller = make_poller(sink)

    await poller.start()
    await wait_until(lambda: sink.calls >= 3)

    last_error = poller.status.last_error
    assert last_error is not None
    assert last_error.startswith("RuntimeError: sink failure on call")
    assert await checkpoint_in(engine) is None
    assert sink.keys == []
    assert poller.status.spans_processed == 0
    assert poller.status.running


async def test_a_database_error_is_reported_in_one_line_without_statement_text(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    poller = make_poller()
    await poller.start()
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE poller_state"))
    wal.seed(10, ms=int(time.time() * 1000) - 60_000)

    await wait_until(lambda: poller.status.last_error is not None)

    last_error = poller.status.last_error
    assert last_error is not None
    assert last_error == "OperationalError: no such table: poller_state"


async def test_drains_past_a_run_of_undecodable_entries_longer_than_a_read(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    # One record per batch: reads of 100 entries. The run of 250 entries the server skips
    # (and counts toward batch_size) fills whole reads with nothing.
    resource = make_resource("checkout").SerializeToString()
    span = make_span("POST /pay").SerializeToString()
    # Stamped in the past; the poller has seen the first ones settle before the rest
    # arrive (a read proves skips only with entries that had settled before the short window
    # was asked for, and nothing settles before its poller has seen a key: horizon.py).
    ms = int(time.time() * 1000) - 10_000
    before = [wal.append(span, resource, ms=ms) for _ in range(3)]
    sink = RecordingSink()
    poller = make_poller(sink, poller_batch_size=1)
    await poller.start()
    await caught_up_at(poller, before[-1])
    for n in range(250):
        if n % 2:
            wal.append(b"\xff\xff\xff", resource, ms=ms)  # the span does not decode
        else:
            wal.append_value(b"\xff not a SpanDataContainer", ms=ms)
    after = [wal.append(span, resource, ms=ms) for _ in range(3)]
    await caught_up_at(poller, after[-1])

    assert sink.keys == before + after
    assert await checkpoint_in(engine) == after[-1]
    status = poller.status
    assert status.spans_processed == 6
    # The first read of 100 after `before` brought nothing; the read after it found older
    # entries, so that whole window was skipped. Skips inside the largest read are not
    # visible.
    assert status.entries_skipped == 100


async def test_caught_up_only_after_a_read_of_the_largest_size(
    make_poller: Callable[..., SpanPoller],
    wal: FakeWal,
    engine: AsyncEngine,
    ingestion_service: FakeIngestionService,
) -> None:
    bad = [wal.append(b"\xff", b"") for _ in range(3)]
    sink = RecordingSink()
    poller = make_poller(sink)

    await poller.start()
    await wait_until(lambda: poller.status.caught_up is True)

    # Nothing was sent, so nothing moved; the short read of 10,000 was not taken as the end.
    assert sink.calls == 0
    assert await checkpoint_in(engine) is None
    assert (b"", 10_000) in ingestion_service.requests
    assert (b"", MAX_BATCH_SIZE) in ingestion_service.requests
    assert poller.status.entries_skipped == 0  # nothing proves these were not the end
    good = wal.seed(2)
    await caught_up_at(poller, good[-1])
    assert sink.keys == good
    assert bad[-1] < good[0]
    assert poller.status.entries_skipped == 0  # the largest read hides its skips


async def test_an_entry_committed_behind_a_newer_key_within_the_window_is_delivered(
    make_poller: Callable[..., SpanPoller], wal: FakeWal
) -> None:
    first = wal.seed(3, ms=int(time.time() * 1000) - 10_000)
    late = wal.reserve_key()  # allocated now, committed after the next key
    newer = wal.seed(1)
    sink = RecordingSink()
    poller = make_poller(sink, poller_settle_seconds=5.0)

    await poller.start()
    # The newer entry is visible but young: the poller stops in front of it. (Not "caught
    # up" yet: in the first W after its first sighting the horizon cannot tell a young
    # entry from a backlog's, so a stop proves nothing then.)
    await wait_until(lambda: poller.status.last_key == first[-1])
    assert sink.keys == first
    wal.append(make_span("late").SerializeToString(), b"", key=late)
    await caught_up_at(poller, newer[-1])

    assert sink.keys == [*first, late, *newer]


async def test_an_entry_committed_later_than_the_window_is_lost(
    make_poller: Callable[..., SpanPoller], wal: FakeWal
) -> None:
    # The horizon is a real bound: what lands behind the checkpoint after it is never read.
    late = wal.reserve_key()
    newer = wal.seed(1)
    sink = RecordingSink()
    poller = make_poller(sink, poller_settle_seconds=0.05)

    await poller.start()
    await caught_up_at(poller, newer[-1])
    wal.append(make_span("too late").SerializeToString(), b"", key=late)
    more = wal.seed(1)
    await caught_up_at(poller, more[-1])

    assert sink.keys == [*newer, *more]


async def test_drains_across_an_ingestion_service_restart(
    make_poller: Callable[..., SpanPoller],
    wal: FakeWal,
    ingestion_service: FakeIngestionService,
    ingestion_server: FakeIngestionServer,
) -> None:
    keys = wal.seed(2000)
    ingestion_service.pause_after = 650
    sink = RecordingSink()
    poller = make_poller(sink)

    await poller.start()
    await ingestion_service.paused.wait()
    await ingestion_server.restart()
    await caught_up_at(poller, keys[-1])

    assert sink.keys == keys


async def test_a_backend_restart_resumes_from_the_checkpoint(
    make_poller: Callable[..., SpanPoller], wal: FakeWal
) -> None:
    keys = wal.seed(500)
    first_sink = RecordingSink()
    first = make_poller(first_sink)
    await first.start()
    await caught_up_at(first, keys[-1])
    await first.stop()

    more = wal.seed(120)
    second_sink = RecordingSink()
    second = make_poller(second_sink)
    await second.start()
    await caught_up_at(second, more[-1])
    await second.stop()

    assert first_sink.keys == keys
    assert second_sink.keys == more


async def test_stop_interrupts_the_idle_wait(
    make_poller: Callable[..., SpanPoller], wal: FakeWal
) -> None:
    keys = wal.seed(3)
    poller = make_poller(RecordingSink(), poller_idle_wait_seconds=3600)
    await poller.start()
    await caught_up_at(poller, keys[-1])

    await asyncio.wait_for(poller.stop(), timeout=30)  # a guard against a hang, not a timing

    assert not poller.status.running
    await poller.stop()  # idempotent


async def test_stop_interrupts_retries_against_an_unreachable_service(
    make_settings: Callable[..., Settings], engine: AsyncEngine, free_port: int
) -> None:
    settings = make_settings(
        ingestion_grpc_address=f"127.0.0.1:{free_port}",
        ingestion_retry_deadline_seconds=3600,
        poller_max_backoff_seconds=3600,
    )
    async with IngestionClient(settings=settings) as client:
        poller = SpanPoller(client, engine, RecordingSink(), settings=settings)
        await poller.start()
        try:
            await wait_until(lambda: client.reachable is False)
            # Set at the first failure, while the client's retries still go on.
            assert poller.status.last_error is not None
            assert poller.status.last_error.startswith("UNAVAILABLE")
            assert poller.status.backlog_age_seconds is None  # nothing read: not known

            await asyncio.wait_for(poller.stop(), timeout=30)

            assert not poller.status.running
        finally:
            await poller.stop()  # idempotent; a failure above must not leave it retrying


async def test_stop_lets_a_batch_being_committed_finish(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, engine: AsyncEngine
) -> None:
    # Stamped a second ago, so all have settled and the first batch is whole (stamped now,
    # a read could find the settle cutoff inside the seeded run and commit a part of it).
    keys = wal.seed(250, ms=int(time.time() * 1000) - 1000)
    sink = RecordingSink()
    sink.hold = asyncio.Event()
    poller = make_poller(sink)
    await poller.start()
    await sink.holding.wait()

    stopping = asyncio.create_task(poller.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    sink.hold.set()
    await stopping

    assert sink.keys == keys[:100]
    assert await checkpoint_in(engine) == keys[99]


async def test_stop_before_start_and_start_twice(
    make_poller: Callable[..., SpanPoller], wal: FakeWal
) -> None:
    keys = wal.seed(5)
    sink = RecordingSink()
    poller = make_poller(sink)
    await poller.stop()
    await poller.start()
    await poller.start()
    await caught_up_at(poller, keys[-1])
    assert sink.keys == keys


async def test_default_sink_counts_spans_per_service_and_logs_totals(
    make_poller: Callable[..., SpanPoller], wal: FakeWal, caplog: pytest.LogCaptureFixture
) -> None:
    span = make_span("GET /").SerializeToString()
    web = make_resource("web").SerializeToString()
    nameless = make_resource(None, host="h1").SerializeToString()
    for n in range(30):
        wal.append(span, web if n % 3 else nameless)
    last = wal.append(span, web)
    poller = make_poller()
    tally = poller.sink
    assert isinstance(tally, ServiceTally)
    tally._summary_interval = 0  # log after every batch

    with caplog.at_level(logging.INFO, logger="junjo_backend.poller.sinks"):
        await poller.start()
        await caught_up_at(poller, last)
        await poller.stop()

    activity = tally.activity()
    assert {name: a.spans for name, a in activity.items()} == {"web": 21, "NO_SERVICE_NAME": 10}
    assert activity["web"].last_key == last
    assert activity["web"].lag_seconds >= 0
    assert tally.spans_total == 31
    summaries = [r for r in caplog.records if r.getMessage() == "span totals"]
    assert summaries
    assert summaries[-1].__dict__["services"]["web"]["spans"] == 21


class _LockThatCannotBeLetGo(PollerLeadership):
    """A stand-in lock (on purpose, not a real one): no real lock of ours fails to be let go,
    since the PostgreSQL one discards a dead session and the file lock closes a descriptor
    it holds, so the only way to reach that failure is a lock written to fail."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.drops = 0  # tries to let go of it: every try for leadership starts with one
        self.broken = True

    async def _take_lock(self) -> bool:
        raise OSError("the lock cannot be taken")

    async def _drop_lock(self) -> None:
        self.drops += 1
        if self.broken:
            raise OSError("the lock cannot be let go")


async def test_a_release_that_fails_after_a_failed_try_is_logged_and_the_poller_tries_again(
    client: IngestionClient,
    engine: AsyncEngine,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "junjo_backend.poller.loop")
    leadership = _LockThatCannotBeLetGo(engine)
    poller = SpanPoller(
        client,
        engine,
        settings=settings.model_copy(update={"poller_leader_retry_seconds": 0.05}),
        leadership=leadership,
    )
    await poller.start()
    try:
        await wait_until(lambda: leadership.drops >= 4)  # two tries, each followed by a release
        assert poller.status.running is True
    finally:
        leadership.broken = False  # stop() lets go of it for real
        await poller.stop()
    released = [
        r for r in caplog.records if r.getMessage().startswith("span poller could not release")
    ]
    assert released
    assert all(r.levelno == logging.DEBUG and r.exc_info for r in released)
    assert "the next try releases again" in released[0].getMessage()
