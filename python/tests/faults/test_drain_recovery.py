"""The poller draining the real Go peer's WAL while its surroundings fail.

- The backend SIGKILLed 5 times and the peer restarted 10 times mid-drain: the checkpoint
  ends on the last WAL key and no span is committed twice.
- The database write-locked by another process for longer than the busy timeout: the
  poller fails, backs off, retries and finishes; auth keeps answering meanwhile.

The backend is the real `serve` with one change (tests/faults/recording_backend.py): its
sink records each committed batch and key in the checkpoint's own transaction, so a batch
committed twice, across restarts included, is a duplicate row. The WAL is filled with
go-compat-tests' walseed while the peer is stopped (fast, and no OTLP needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from harness.waiting import free_port, wait_until
from junjo_backend._wire.ingestion import auth_pb2_grpc

from .recovery_helpers import (
    AuthProbe,
    Ledger,
    delivered_spans,
    recording_backend_command,
    seed_wal,
    sqlite_busy_timeout,
    tally_text,
)

if TYPE_CHECKING:
    from pathlib import Path

    from harness.peer import PeerPorts
    from tests.serve_process import ServeProcess

    from .conftest import FaultKit, GoPeer, OutputFolder

PEER_RESTARTS = 10
BACKEND_KILLS = 5  # on every second peer restart
SPANS = 310_000
POLLER_BATCH_SIZE = 200
PROGRESS_BEFORE_FAULT = 2_000
# A fault drains up to ~65,000 spans here (a backend restart); below this backlog, a peer
# restart adds TOP_UP spans, so the next faults still find a backlog.
LOW_BACKLOG = 150_000
TOP_UP = 75_000
LOCK_SEED = 120_000
LOCKED_AFTER = 20_000
LOCK_BEYOND_BUSY_TIMEOUT_SECONDS = 4.0
# Hang guards only (generous): figures go to the fault table.
DRAIN_LIMIT_SECONDS = 240.0


def _backend(kit: FaultKit, ports: PeerPorts, name: str) -> ServeProcess:
    return kit.serve(
        {
            "DATABASE_URL": kit.sqlite_url(),
            "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{ports.backend}",
            "INGESTION_GRPC_ADDRESS": f"127.0.0.1:{ports.internal}",
            "HTTP_PORT": str(free_port()),
            # Prompt retries after the peer or the database comes back.
            "POLLER_MAX_BACKOFF_SECONDS": "0.5",
            "POLLER_IDLE_WAIT_SECONDS": "0.1",
            # Smaller batches than the default 1,000: more commits, so each fault lands
            # between or inside commits rather than after the drain has raced past it.
            "POLLER_BATCH_SIZE": str(POLLER_BATCH_SIZE),
            "JUNJO_FAULT_DELIVERED": str(kit.folder / "delivered.txt"),
        },
        command=recording_backend_command(),
        name=name,
    )


async def test_backend_killed_and_peer_restarted_mid_drain(kit: FaultKit, go_peer: GoPeer) -> None:
    ports = go_peer.ports()
    wal_dir = kit.folder / "wal"
    seeded = [seed_wal(wal_dir, SPANS, kit.output)]
    ledger = Ledger(kit.folder / "junjo.db")
    backend = _backend(kit, ports, "recording-backend")
    backlog_at_fault: list[int] = []  # spans still waiting in the WAL when each fault hit
    started = time.monotonic()
    try:
        backend.start()
        await backend.wait_ready()
        peer = await go_peer.fleet.launch(ports, wal_dir=wal_dir)

        # Each fault once the poller has moved a little past the last one (so it is
        # draining, not waiting). The poller keeps draining while a fault runs (a peer's
        # graceful stop finishes its stream; a restarted backend drains before it has
        # answered our readiness call), so the WAL is topped up while the peer is stopped
        # whenever the backlog runs low: every fault then finds spans still waiting.
        faults = [
            fault
            for restart in range(PEER_RESTARTS)
            for fault in (("peer", "kill") if restart % 2 == 1 else ("peer",))
        ]
        for fault in faults:
            floor = ledger.committed() + PROGRESS_BEFORE_FAULT
            await wait_until(
                functools.partial(ledger.reached, floor),
                f"the drain reaches {floor:,}",
                limit=DRAIN_LIMIT_SECONDS,
            )
            backlog_at_fault.append(sum(s.count for s in seeded) - ledger.committed())
            if fault == "kill":
                backend.kill()
                backend.start()
                await backend.wait_ready()
            else:
                await peer.stop()
                if sum(s.count for s in seeded) - ledger.committed() < LOW_BACKLOG:
                    seeded.append(seed_wal(wal_dir, TOP_UP, kit.output))
                await peer.start()
                await peer.wait_serving()

        last_key = seeded[-1].last_key
        await wait_until(
            lambda: ledger.checkpoint() == last_key,
            "the checkpoint reaches the last WAL key",
            limit=DRAIN_LIMIT_SECONDS,
        )
        elapsed = time.monotonic() - started
        assert backend.stop() == 0, backend.text()
    finally:
        backend.close()

    total = sum(s.count for s in seeded)
    check = ledger.check()
    delivered = delivered_spans(kit.folder / "delivered.txt")
    kills = backend.runs - 1
    assert kills == BACKEND_KILLS
    assert ledger.checkpoint() == last_key
    assert check.keys_twice == 0, check
    assert check.overlapping_batches == 0, check
    assert check.spans == check.distinct_keys == total, check
    assert (check.min_key, check.max_key) == (seeded[0].first_key, last_key), check
    assert min(backlog_at_fault) > 0, f"a fault hit after the drain ended: {backlog_at_fault}"
    kit.table.add(
        "backend SIGKILL + Go peer restart mid-drain",
        f"{kills} kills, {PEER_RESTARTS} peer restarts, {total:,} spans "
        f"({len(seeded)} walseed runs)",
        f"checkpoint == last WAL key; 0 spans and 0 of {check.batches:,} batches committed "
        f"twice; {delivered - check.spans:,} spans re-delivered (handed to the sink, rolled "
        f"back); backlog at each fault {min(backlog_at_fault):,}-{max(backlog_at_fault):,}; "
        f"{elapsed:.0f} s",
    )


@dataclass(frozen=True, slots=True)
class _Lock:
    """What happened around one write lock held by another process."""

    committed_before: int
    held_seconds: float
    committed_while_held: int
    first_commit_after_release_seconds: float


async def _lock_mid_drain(
    ledger: Ledger, database: Path, seconds: float, output: OutputFolder
) -> _Lock:
    """Hold the write lock for `seconds`; wait for the first commit after it.

    In rollback-journal mode (the Go backend's, ours) an exclusive lock keeps every other
    connection out, readers too, so the holder itself counts the committed spans, as it
    takes the lock and again just before it lets go.
    """
    holder = _lock_holder(database, output)
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        locked = await asyncio.to_thread(holder.stdout.readline)
        assert locked.startswith("locked "), locked
        before = int(locked.split()[1])
        started = time.monotonic()
        await asyncio.sleep(seconds)
        holder.stdin.write("release\n")
        holder.stdin.flush()
        held_line = await asyncio.to_thread(holder.stdout.readline)
        assert held_line.startswith("held "), held_line
        during = int(held_line.split()[1]) - before  # read while the lock is still held
        assert await asyncio.to_thread(holder.stdout.readline) == "released\n"
        held = time.monotonic() - started
        released = time.monotonic()
        await wait_until(
            functools.partial(ledger.reached, before + during + 1),
            "a commit after the lock is released",
            limit=DRAIN_LIMIT_SECONDS,
        )
        return _Lock(before, held, during, time.monotonic() - released)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()


def _lock_holder(path: Path, fault_output: OutputFolder) -> subprocess.Popen[str]:
    """Another process that takes SQLite's write lock (BEGIN EXCLUSIVE) until told to release.

    It prints the spans committed so far when it has the lock and again before releasing it.
    """
    script = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "count = 'SELECT coalesce(sum(spans), 0) FROM recorded_batches'\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', conn.execute(count).fetchone()[0], flush=True)\n"
        "sys.stdin.readline()\n"
        "print('held', conn.execute(count).fetchone()[0], flush=True)\n"
        "conn.execute('COMMIT')\n"
        "print('released', flush=True)\n"
    )
    with fault_output.path("sqlite-lock-holder").open("w") as errors:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )


async def test_database_locked_beyond_busy_timeout_mid_drain(
    kit: FaultKit, go_peer: GoPeer
) -> None:
    ports = go_peer.ports()
    wal_dir = kit.folder / "wal"
    seeded = seed_wal(wal_dir, LOCK_SEED, kit.output)
    database = kit.folder / "junjo.db"
    keys = await kit.probe_keys(kit.sqlite_url())
    busy_timeout = await sqlite_busy_timeout(kit.sqlite_url())
    ledger = Ledger(database)
    backend = _backend(kit, ports, "recording-backend-locked")
    stop_probe = asyncio.Event()
    try:
        backend.start()
        await backend.wait_ready()
        await go_peer.fleet.launch(ports, wal_dir=wal_dir)
        await wait_until(
            functools.partial(ledger.reached, LOCKED_AFTER),
            "the drain is under way",
            limit=DRAIN_LIMIT_SECONDS,
        )
        async with grpc.aio.insecure_channel(backend.auth_address) as channel:
            probe = AuthProbe(auth_pb2_grpc.InternalAuthServiceStub(channel), keys.kinds(), {})
            probing = asyncio.create_task(probe.run(stop_probe))
            try:
                lock = await _lock_mid_drain(
                    ledger, database, busy_timeout + LOCK_BEYOND_BUSY_TIMEOUT_SECONDS, kit.output
                )
                await wait_until(
                    lambda: ledger.checkpoint() == seeded.last_key,
                    "the checkpoint reaches the last WAL key",
                    limit=DRAIN_LIMIT_SECONDS,
                )
            finally:
                stop_probe.set()
                await probing
        assert backend.stop() == 0, backend.text()
    finally:
        backend.close()

    check = ledger.check()
    failures = backend.count_in_output("span poller batch failed")
    outcomes = Counter[str]()
    for counter in probe.tallies.values():
        outcomes.update(counter)
    assert lock.committed_before < seeded.count, "the drain ended before the lock"
    assert lock.committed_while_held == 0, "a batch committed through another process's lock"
    # The batch handed to the sink while the lock was held rolled back and came again.
    redelivered = delivered_spans(kit.folder / "delivered.txt") - check.spans
    assert redelivered >= 1, "no batch failed on the lock"
    assert check.keys_twice == 0, check
    assert check.overlapping_batches == 0, check
    assert check.spans == check.distinct_keys == seeded.count, check
    assert ledger.checkpoint() == seeded.last_key
    # Auth answers throughout; never `true` for a revoked or unknown key, never `false`
    # for the valid one. INTERNAL is the honest answer when it cannot tell; with the rollback
    # journal the lock also holds a key read back for up to the busy timeout, longer than
    # the caller's deadline, and DEADLINE_EXCEEDED is as closed as INTERNAL to the Go side.
    assert set(outcomes) <= {"true", "false", "INTERNAL", "DEADLINE_EXCEEDED"}, probe.tallies
    assert probe.tallies["revoked"]["true"] == probe.tallies["unknown"]["true"] == 0
    assert probe.tallies["valid"]["false"] == 0
    kit.table.add(
        "SQLite write-locked by another process mid-drain",
        f"{lock.held_seconds:.0f} s lock (busy timeout {busy_timeout:g} s), {seeded.count:,} spans",
        f"0 commits while locked; {failures} failed batch attempts logged, backed off and "
        f"retried ({redelivered:,} spans re-delivered); "
        f"first commit {lock.first_commit_after_release_seconds:.1f} s after release; "
        f"checkpoint == last WAL key; "
        f"0 spans twice, 0 missing; auth during drain: {tally_text(probe.tallies)}",
    )
