"""Replicas on one database: one poller drains, the others stand by, commits are fenced.

Two pollers with engines of their own share one database (a SQLite file, or a fresh
database on the session's PostgreSQL cluster) and one in-process ingestion server, as two
replicas do.
"""

from __future__ import annotations

import asyncio
import fnmatch
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Column, LargeBinary, MetaData, Table, func, insert, select, text, update

from harness.waiting import wait_until
from junjo_backend.database import close_engine, create_engine, init_schema, poller_leadership
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.poller.checkpoint import load_checkpoint
from junjo_backend.poller.leadership import (
    FileLockLeadership,
    LeadershipLost,
    PostgresLeadership,
    leadership_for,
    lock_file_for,
)
from junjo_backend.poller.loop import SpanPoller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.settings import Settings

    from .fake_ingestion import FakeIngestionServer, FakeWal

# The sink's own table, no unique key: a span committed twice shows as two rows.
ledger_metadata = MetaData()
committed_keys = Table("committed_keys", ledger_metadata, Column("key", LargeBinary))


class LedgerSink:
    """Writes each span's key in the checkpoint's transaction; can hold a batch mid-commit."""

    def __init__(self) -> None:
        self.handed = 0
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        self.handed += len(batch)
        await conn.execute(insert(committed_keys), [{"key": record.key} for record in batch])
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()


async def ledger(engine: AsyncEngine) -> tuple[int, int]:
    """(rows, distinct keys) committed by every sink."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(func.count(), func.count(func.distinct(committed_keys.c.key)))
            )
        ).one()
    return int(row[0]), int(row[1])


async def checkpoint_in(engine: AsyncEngine) -> bytes | None:
    async with engine.connect() as conn:
        return await load_checkpoint(conn)


async def open_engine(url: str) -> AsyncEngine:
    engine = create_engine(url)
    await init_schema(engine)
    async with engine.begin() as conn:
        await conn.run_sync(ledger_metadata.create_all)
    return engine


class Replicas:
    """Pollers that each have an engine and a client of their own, as separate replicas."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pollers: list[SpanPoller] = []
        self._engines: list[AsyncEngine] = []
        self._clients: list[IngestionClient] = []

    async def start(self, sink: LedgerSink) -> SpanPoller:
        engine = await open_engine(self.settings.database_url)
        client = IngestionClient(settings=self.settings)
        self._engines.append(engine)
        self._clients.append(client)
        poller = SpanPoller(client, engine, sink, settings=self.settings)
        self.pollers.append(poller)
        await poller.start()
        return poller

    async def close(self) -> None:
        for poller in self.pollers:
            await poller.stop()
        for client in self._clients:
            await client.close()
        for engine in self._engines:
            await close_engine(engine)


@pytest.fixture
async def make_replicas(
    make_settings: Callable[..., Settings], ingestion_server: FakeIngestionServer
) -> AsyncIterator[Callable[[str], Replicas]]:
    made: list[Replicas] = []

    def build(database_url: str) -> Replicas:
        replicas = Replicas(
            make_settings(
                database_url=database_url,
                ingestion_grpc_address=ingestion_server.address,
                poller_leader_retry_seconds=0.2,
            )
        )
        made.append(replicas)
        return replicas

    yield build
    for replicas in made:
        await replicas.close()


async def _one_drains_then_the_other_takes_over(replicas: Replicas, wal: FakeWal) -> None:
    """The scenario both databases share; asserts as it goes."""
    settled = int(time.time() * 1000) - 1000
    first = wal.seed(500, ms=settled)
    sinks = [LedgerSink(), LedgerSink()]
    pollers = [await replicas.start(sinks[0]), await replicas.start(sinks[1])]
    engine = await open_engine(replicas.settings.database_url)
    try:
        await wait_until(lambda: any(p.status.last_key == first[-1] for p in pollers))
        # Let the standby try for leadership a few times while the leader idles.
        await asyncio.sleep(replicas.settings.poller_leader_retry_seconds * 3)
        roles = sorted(str(p.status.role) for p in pollers)
        assert roles == ["leader", "standby"]
        leader = next(p for p in pollers if p.status.role == "leader")
        standby = next(p for p in pollers if p is not leader)
        assert standby.status.spans_processed == 0
        assert standby.status.running is True
        assert await ledger(engine) == (500, 500)

        await leader.stop()
        second = wal.seed(300, ms=int(time.time() * 1000) - 1000)
        await wait_until(lambda: standby.status.last_key == second[-1])
        assert standby.status.role == "leader"
        assert standby.status.role_since is not None
        assert standby.status.spans_processed == 300
        assert await ledger(engine) == (800, 800)
        assert await checkpoint_in(engine) == second[-1]
        assert sum(sink.handed for sink in sinks) == 800
    finally:
        await close_engine(engine)


async def test_sqlite_one_replica_drains_and_a_standby_takes_over(
    make_replicas: Callable[[str], Replicas], database_url: str, wal: FakeWal, tmp_path: Path
) -> None:
    await _one_drains_then_the_other_takes_over(make_replicas(database_url), wal)
    lock_file = tmp_path / "data" / ".junjo.db.poller-lock"
    assert lock_file.exists()
    # An operator's `rm data/junjo.db*` (and `rm data/*`) leaves the lock file alone.
    assert not fnmatch.fnmatch(lock_file.name, "junjo.db*")
    assert not fnmatch.fnmatch(lock_file.name, "[!.]*")


async def test_sqlite_replicas_on_a_file_uri_have_one_leader(
    make_replicas: Callable[[str], Replicas], wal: FakeWal, tmp_path: Path
) -> None:
    # Issue 20, item 7: with a `file:` URI both replicas drained (7 step-downs in 3 s).
    database = tmp_path / "data" / "junjo.db"
    url = f"sqlite+aiosqlite:///file:{database}?uri=true"
    await _one_drains_then_the_other_takes_over(make_replicas(url), wal)
    assert (tmp_path / "data" / ".junjo.db.poller-lock").exists()


async def test_sqlite_every_spelling_of_one_file_contends_for_one_lock(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "data" / "junjo.db"
    (tmp_path / "link.db").symlink_to(database)
    urls = [
        f"sqlite+aiosqlite:///{database}",
        f"sqlite+aiosqlite:///file:{database}?uri=true",
        "sqlite+aiosqlite:///data/junjo.db",
        f"sqlite+aiosqlite:///{tmp_path / 'link.db'}",
        "sqlite+aiosqlite:///file:link.db?uri=true&mode=rwc",
    ]
    engines = [await open_engine(url) for url in urls]
    leaderships = [
        leadership_for(engine, make_settings(database_url=url))
        for engine, url in zip(engines, urls, strict=True)
    ]
    try:
        assert [await leadership.acquire() for leadership in leaderships] == [
            True,
            False,
            False,
            False,
            False,
        ]
        await leaderships[0].release()
        assert await leaderships[3].acquire() is True
        assert [await leadership.acquire() for leadership in leaderships[:3]] == [False] * 3
    finally:
        for leadership in leaderships:
            await leadership.close()
        for engine in engines:
            await close_engine(engine)


_LOCK_HOLDER = (
    "import fcntl, sys\n"
    "f = open(sys.argv[1], 'a')\n"
    "fcntl.flock(f, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
)


def _hold_lock_file(path: Path) -> subprocess.Popen[str]:
    """Another process that flocks `path` until a line arrives on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_sqlite_a_lock_held_by_another_process_keeps_the_poller_standing_by(
    make_replicas: Callable[[str], Replicas], database_url: str, wal: FakeWal, tmp_path: Path
) -> None:
    lock_file = lock_file_for(tmp_path / "data" / "junjo.db")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    holder = _hold_lock_file(lock_file)
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        keys = wal.seed(200, ms=int(time.time() * 1000) - 1000)
        replicas = make_replicas(database_url)
        poller = await replicas.start(LedgerSink())
        await asyncio.sleep(replicas.settings.poller_leader_retry_seconds * 4)
        assert poller.status.role == "standby"
        assert poller.status.spans_processed == 0
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        await wait_until(lambda: poller.status.last_key == keys[-1])
        after = poller.status
        assert after.role == "leader"
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()


async def test_sqlite_a_standby_that_saw_the_backlog_takes_it_over_without_holding_it(
    make_settings: Callable[..., Settings],
    ingestion_server: FakeIngestionServer,
    database_url: str,
    wal: FakeWal,
    tmp_path: Path,
) -> None:
    """A standby's probe reads the entry after the checkpoint and tells its horizon.

    The backlog is fresh when it lands (inside the settle window) while another process
    holds the lock. Once the lock is free, the standby has seen the backlog for longer than
    W, so it delivers it at once; a poller that learns of it only by its first read holds
    all of it for W more.
    """
    window = 8.0
    settings = make_settings(
        database_url=database_url,
        ingestion_grpc_address=ingestion_server.address,
        poller_leader_retry_seconds=0.2,
        poller_settle_seconds=window,
    )
    lock_file = lock_file_for(tmp_path / "data" / "junjo.db")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    holder = _hold_lock_file(lock_file)
    assert holder.stdin is not None
    assert holder.stdout is not None
    replicas = Replicas(settings)
    try:
        assert holder.stdout.readline() == "locked\n"
        poller = await replicas.start(LedgerSink())
        keys = wal.seed(300, ms=int(time.time() * 1000))
        # Two probe periods (2 s each) for a sighting, then W past it.
        await asyncio.sleep(window + 4.5)
        assert not poller.leadership.held
        assert poller.status.spans_processed == 0
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        await wait_until(lambda: poller.status.role == "leader")
        # Held for W, it would come W after the takeover: half of it is the bound, and
        # ample for a read of 300 entries (the window is this long to leave that margin).
        await wait_until(
            lambda: poller.status.last_key == keys[-1],
            "the backlog, delivered without waiting out the window again",
            limit=window / 2,
        )
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
        await replicas.close()


async def test_postgresql_one_replica_drains_and_a_standby_takes_over(
    make_replicas: Callable[[str], Replicas], postgres_url: str, wal: FakeWal
) -> None:
    await _one_drains_then_the_other_takes_over(make_replicas(postgres_url), wal)


async def _terminate(engine: AsyncEngine, pid: int | None) -> None:
    assert pid is not None
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


async def test_postgresql_a_commit_after_the_lock_connection_is_terminated_fails(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    engine = await open_engine(postgres_url)
    settings = make_settings(database_url=postgres_url, poller_leader_retry_seconds=60)
    leadership = leadership_for(engine, settings)
    assert isinstance(leadership, PostgresLeadership)
    try:
        assert await leadership.acquire()
        async with engine.begin() as conn:
            await conn.execute(insert(committed_keys).values(key=b"in the batch"))
            await _terminate(engine, leadership.backend_pid)
            await wait_until(leadership.lost.is_set)  # asyncpg's termination callback
            # A stand-in for the moment before asyncpg has noticed (the callback runs when
            # the socket's end reaches the event loop): pg_locks alone must refuse.
            leadership.lost.clear()
            with pytest.raises(LeadershipLost, match="session has ended"):
                await leadership.fence(conn)
            await conn.rollback()
        assert not leadership.held
        assert await ledger(engine) == (0, 0)
    finally:
        await leadership.close()
        await close_engine(engine)


async def test_postgresql_a_successor_waits_for_the_batch_under_way_and_fences_it_off(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    engine = await open_engine(postgres_url)
    settings = make_settings(database_url=postgres_url, poller_leader_retry_seconds=60)
    old, new = leadership_for(engine, settings), leadership_for(engine, settings)
    assert isinstance(old, PostgresLeadership)
    try:
        assert await old.acquire()
        assert not await new.acquire()  # the lock is taken
        async with engine.begin() as conn:
            await old.fence(conn)  # the batch is under way, fenced in time
            await conn.execute(insert(committed_keys).values(key=b"old leader's batch"))
            await _terminate(engine, old.backend_pid)
            # The lock is free, but the successor's epoch bump waits for this transaction.
            successor = asyncio.create_task(new.acquire())
            await asyncio.sleep(0.5)
            assert not successor.done()
        assert await asyncio.wait_for(successor, 30)
        assert await ledger(engine) == (1, 1)
        # From now on the old leader's commits fail, whatever it believes.
        async with engine.begin() as conn:
            with pytest.raises(LeadershipLost):
                await old.fence(conn)
            await conn.rollback()
        async with engine.connect() as conn:
            epoch = await conn.scalar(select(poller_leadership.c.epoch))
        assert epoch == 2  # two leaders so far
    finally:
        await old.close()
        await new.close()
        await close_engine(engine)


async def test_postgresql_a_standby_tries_again_as_the_leaders_lease_runs_out(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    """A standby that finds a fresh lease waits until just past it, not a whole retry."""
    engine = await open_engine(postgres_url)
    settings = make_settings(
        database_url=postgres_url, poller_leader_retry_seconds=60, poller_leader_lease_seconds=2
    )
    leader, standby = leadership_for(engine, settings), leadership_for(engine, settings)
    try:
        assert standby.next_try_in(60) == 60  # nothing seen yet: the retry interval
        assert await leader.acquire()
        assert not await standby.acquire()
        assert 0 < standby.next_try_in(60) <= 2.05
        assert standby.next_try_in(0.5) == 0.5  # never later than a retry would come
    finally:
        await leader.close()
        await standby.close()
        await close_engine(engine)


async def test_postgresql_a_poller_whose_lock_connection_is_terminated_stops_and_recovers(
    make_replicas: Callable[[str], Replicas], postgres_url: str, wal: FakeWal
) -> None:
    replicas = make_replicas(postgres_url)
    keys = wal.seed(250, ms=int(time.time() * 1000) - 1000)
    sink = LedgerSink()
    sink.hold = asyncio.Event()
    poller = await replicas.start(sink)
    engine = await open_engine(postgres_url)
    try:
        await asyncio.wait_for(sink.holding.wait(), 30)  # the first batch, mid-commit
        leadership = poller.leadership
        assert isinstance(leadership, PostgresLeadership)
        led_since = poller.status.role_since
        await _terminate(engine, leadership.backend_pid)
        await wait_until(leadership.lost.is_set)  # asyncpg's termination callback
        release, sink.hold = sink.hold, None
        release.set()
        # The held batch's commit fails; the poller leads again and delivers it once.
        await wait_until(lambda: poller.status.last_key == keys[-1])
        assert poller.status.role == "leader"
        assert poller.status.role_since != led_since
        assert await ledger(engine) == (250, 250)
        assert sink.handed > 250  # the failed batch was handed twice
    finally:
        await close_engine(engine)


async def test_a_commit_fails_once_another_replica_has_bumped_the_epoch(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    engine = await open_engine(database_url)
    leadership = leadership_for(engine, make_settings(database_url=database_url))
    try:
        assert await leadership.acquire()
        # What a successor does on taking over (here by hand: on one machine no other
        # process can take the lock while this one holds it).
        async with engine.begin() as conn:
            await conn.execute(
                update(poller_leadership).values(epoch=poller_leadership.c.epoch + 1)
            )
        async with engine.begin() as conn:
            await conn.execute(insert(committed_keys).values(key=b"in the batch"))
            with pytest.raises(LeadershipLost, match="superseded"):
                await leadership.fence(conn)
            await conn.rollback()
        assert not leadership.held
        assert await ledger(engine) == (0, 0)
    finally:
        await leadership.close()
        await close_engine(engine)


async def test_file_lock_leadership_is_lost_when_its_lock_file_is_removed(
    database_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    engine = await open_engine(database_url)
    leadership = leadership_for(engine, make_settings(database_url=database_url))
    assert isinstance(leadership, FileLockLeadership)
    try:
        assert await leadership.acquire()
        leadership.lock_path.unlink()
        async with engine.begin() as conn:
            with pytest.raises(LeadershipLost):
                await leadership.fence(conn)
            await conn.rollback()
        assert not leadership.held
        assert tmp_path in leadership.lock_path.parents
    finally:
        await leadership.close()
        await close_engine(engine)
