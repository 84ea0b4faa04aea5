"""Two replicas on one PostgreSQL and one Go peer: one drains, the leader fails, nothing is lost.

- The leader SIGKILLed mid-drain: the standby takes over and finishes; the checkpoint ends
  on the last WAL key, no span is committed twice, and the spans handed to the sinks of
  both replicas total N plus at most the one batch the kill rolled back.
- The leader SIGSTOPped for 30 s (a frozen process): its lease goes unrenewed, and the
  standby ends its sessions and drains within the lease plus a retry; when A wakes, its
  late commits are refused (fencing); every span is committed exactly once.
- The leader SIGSTOPped mid-drain, for less than its lease: while it holds the lock nobody
  drains (the standby stays a standby); SIGCONT and it goes on. Then its lock connection
  is terminated (pg_terminate_backend): it stops, the standby takes over, no batch is
  committed twice.

Replicas are the recording backend (recording_backend.py: `serve` whose sink writes every
committed batch and key to the ledger tables in the checkpoint's transaction), here on a
fresh database of the session's PostgreSQL cluster; replica A's runs are numbered from 1
and B's from 101, so the ledger says who committed what. The WAL is filled with walseed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from harness.waiting import wait_until

from .recovery_helpers import seed_wal
from .replica_helpers import PostgresLedger, Replica, fresh_database

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.postgres_cluster import PostgresCluster

    from .conftest import FaultKit, GoPeer
    from .recovery_helpers import Seeded

SPANS = 60_000
POLLER_BATCH_SIZE = 200
LEADER_RETRY_SECONDS = 1.0
FAULT_AFTER = 6_000  # spans committed before the fault
STOPPED_SECONDS = 4 * LEADER_RETRY_SECONDS  # the standby tries ~4 times meanwhile
B_FIRST_RUN = 100  # B's runs are numbered from 101
LEASE_SECONDS = 15.0  # POLLER_LEADER_LEASE_SECONDS's default, left unset
FROZEN_SECONDS = 30.0  # twice the lease: the standby must take over while A is frozen
# Hang guards only (generous): figures go to the fault table.
LIMIT_SECONDS = 120.0


class Setup:
    """Two replicas (A leads first), the ledger, the seeded WAL."""

    def __init__(self, a: Replica, b: Replica, ledger: PostgresLedger, seeded: Seeded) -> None:
        self.a, self.b, self.ledger, self.seeded = a, b, ledger, seeded

    async def committed_by(self) -> tuple[int, int]:
        """Spans committed by A's runs and by B's runs."""
        return await self.ledger.committed_by_runs(B_FIRST_RUN)


async def _role(replica: Replica) -> str | None:
    try:
        role = (await replica.poller())["role"]
    except httpx.TransportError:
        return None
    return str(role) if role is not None else None


async def _has_role(replica: Replica, role: str) -> bool:
    return await _role(replica) == role


@pytest.fixture
async def setup(postgres: PostgresCluster, kit: FaultKit, go_peer: GoPeer) -> AsyncIterator[Setup]:
    """A leads, B stands by, the peer serves the seeded WAL: the drain is under way."""
    ports = go_peer.ports()
    wal_dir = kit.folder / "wal"
    seeded = seed_wal(wal_dir, SPANS, kit.output)
    url = await fresh_database(postgres)
    settings = {
        "POLLER_BATCH_SIZE": str(POLLER_BATCH_SIZE),
        "POLLER_LEADER_RETRY_SECONDS": str(LEADER_RETRY_SECONDS),
        "POLLER_MAX_BACKOFF_SECONDS": "0.5",
        "POLLER_IDLE_WAIT_SECONDS": "0.1",
    }

    def replica(name: str, auth_port: int | None = None) -> Replica:
        return Replica(
            name,
            kit=kit,
            database_url=url,
            ingestion_address=f"127.0.0.1:{ports.internal}",
            auth_port=auth_port,
            settings=settings,
        )

    # A on the auth port the peer dials (its start-up waits for our auth server).
    a, b = replica("replica-a", ports.backend), replica("replica-b")
    b.runs = B_FIRST_RUN
    ledger = PostgresLedger(url)
    try:
        a.start()
        await a.wait_ready()
        await wait_until(lambda: _has_role(a, "leader"), "A leads", limit=LIMIT_SECONDS)
        b.start()
        await b.wait_ready()
        await wait_until(lambda: _has_role(b, "standby"), "B stands by", limit=LIMIT_SECONDS)
        await go_peer.fleet.launch(ports, wal_dir=wal_dir)
        await wait_until(
            lambda: _committed_at_least(ledger, FAULT_AFTER),
            "the drain is under way",
            limit=LIMIT_SECONDS,
        )
        yield Setup(a, b, ledger, seeded)
    finally:
        for process in (a, b):
            if process.running:
                process.signal(signal.SIGCONT)
            process.close()
        await ledger.close()


async def _committed_at_least(ledger: PostgresLedger, spans: int) -> bool:
    return await ledger.committed() >= spans


async def _finished(setup: Setup) -> None:
    """Wait for the checkpoint to reach the last WAL key."""
    last_key = setup.seeded.last_key

    async def at_last_key() -> bool:
        return await setup.ledger.checkpoint() == last_key

    await wait_until(at_last_key, "the checkpoint reaches the last WAL key", limit=LIMIT_SECONDS)


async def _assert_exactly_once(setup: Setup) -> int:
    """No span committed twice, every span committed; returns the spans re-handed."""
    check = await setup.ledger.check()
    assert check.keys_twice == 0, check
    assert check.overlapping_batches == 0, check
    assert check.spans == check.distinct_keys == SPANS, check
    assert (check.min_key, check.max_key) == (setup.seeded.first_key, setup.seeded.last_key)
    assert await setup.ledger.checkpoint() == setup.seeded.last_key
    # The PostgreSQL span store, written in the same transactions: exactly the WAL's spans.
    spans, distinct_spans, patches, distinct_patches = await setup.ledger.span_store()
    assert spans == distinct_spans == SPANS, (spans, distinct_spans)
    assert patches == distinct_patches, (patches, distinct_patches)
    handed = setup.a.handed + setup.b.handed
    # Across replicas: N, plus at most the one batch the fault rolled back.
    assert SPANS <= handed <= SPANS + POLLER_BATCH_SIZE, (setup.a.handed, setup.b.handed)
    return handed - SPANS


async def test_leader_sigkilled_mid_drain_the_standby_finishes(setup: Setup, kit: FaultKit) -> None:
    a, b = setup.a, setup.b
    standby = await b.poller()
    assert standby["role"] == "standby", standby
    assert standby["spans_processed"] == 0, standby
    started = time.monotonic()

    a.kill()
    killed = time.monotonic()

    async def b_committed() -> bool:
        return (await setup.committed_by())[1] > 0

    failover = await wait_until(b_committed, "B commits its first batch", limit=LIMIT_SECONDS)
    await _finished(setup)
    elapsed = time.monotonic() - started
    by_a, by_b = await setup.committed_by()
    b_view = await b.poller()
    assert b_view["role"] == "leader", b_view
    assert b_view["spans_processed"] == by_b, (b_view, by_b)
    assert by_a + by_b == SPANS
    rehanded = await _assert_exactly_once(setup)
    assert b.stop() == 0, b.text()
    assert killed - started < LIMIT_SECONDS
    kit.table.add(
        "replicas on PostgreSQL: leader SIGKILL mid-drain",
        f"1 kill, {SPANS:,} spans",
        f"standby's first commit {failover:.1f} s after the kill (retry "
        f"{LEADER_RETRY_SECONDS:g} s); committed A {by_a:,} + B {by_b:,} = {SPANS:,}, 0 twice; "
        f"{rehanded} re-handed (the killed batch); checkpoint == last WAL key; "
        f"{elapsed:.0f} s to the end",
    )


async def test_leader_sigstopped_then_its_lock_connection_terminated(
    setup: Setup, kit: FaultKit
) -> None:
    a, b, ledger = setup.a, setup.b, setup.ledger

    a.signal(signal.SIGSTOP)
    # A commit already sent when A stopped still lands; count from a moment later.
    await asyncio.sleep(0.5)
    before = await setup.committed_by()
    await asyncio.sleep(STOPPED_SECONDS)
    during = await setup.committed_by()
    standby = await b.poller()
    assert during == before, "a second replica drained while the leader held the lock"
    assert standby["role"] == "standby", standby
    assert b.handed == 0
    a.signal(signal.SIGCONT)

    async def a_goes_on() -> bool:
        return (await setup.committed_by())[0] > during[0]

    await wait_until(a_goes_on, "A drains again after SIGCONT", limit=LIMIT_SECONDS)
    pid = await ledger.lock_holder_pid()
    assert pid is not None
    assert await ledger.terminate(pid)
    terminated = time.monotonic()

    async def b_committed() -> bool:
        return (await setup.committed_by())[1] > 0

    failover = await wait_until(b_committed, "B commits its first batch", limit=LIMIT_SECONDS)
    a_after_failover = (await setup.committed_by())[0]
    await _finished(setup)
    by_a, by_b = await setup.committed_by()
    a_view, b_view = await a.poller(), await b.poller()
    assert a_view["role"] == "standby", a_view
    assert b_view["role"] == "leader", b_view
    assert by_a == a_after_failover, "A committed after the standby took over"
    assert a_view["spans_processed"] == by_a
    assert b_view["spans_processed"] == by_b
    rehanded = await _assert_exactly_once(setup)
    assert a.stop() == 0, a.text()
    assert b.stop() == 0, b.text()
    kit.table.add(
        "replicas on PostgreSQL: leader SIGSTOP, then its lock connection terminated",
        f"{STOPPED_SECONDS:g} s stopped, 1 pg_terminate_backend, {SPANS:,} spans",
        f"0 spans committed by anyone while stopped (standby stayed standby); after the "
        f"termination the standby's first commit in {failover:.1f} s; committed A {by_a:,} + "
        f"B {by_b:,}, 0 twice; {rehanded} re-handed; {time.monotonic() - terminated:.0f} s "
        f"from the termination to the end",
    )


async def test_leader_frozen_longer_than_its_lease_the_standby_takes_over(
    setup: Setup, kit: FaultKit
) -> None:
    a, b = setup.a, setup.b
    a.signal(signal.SIGSTOP)
    stopped = time.monotonic()

    async def b_committed() -> bool:
        return (await setup.committed_by())[1] > 0

    takeover = await wait_until(b_committed, "B takes over from the frozen A", limit=LIMIT_SECONDS)
    took_over_while_frozen = time.monotonic() - stopped < FROZEN_SECONDS
    await _finished(setup)
    drained = time.monotonic() - stopped
    await asyncio.sleep(max(0.0, FROZEN_SECONDS - (time.monotonic() - stopped)))
    at_wake = await setup.committed_by()
    a.signal(signal.SIGCONT)
    await wait_until(lambda: _has_role(a, "standby"), "A stands by once awake", limit=LIMIT_SECONDS)
    # A's loop has run again (its pause after stepping down, and more): any late commit of
    # its own would be in the ledger by now.
    await asyncio.sleep(4 * LEADER_RETRY_SECONDS)
    by_a, by_b = await setup.committed_by()
    a_view, b_view = await a.poller(), await b.poller()
    assert took_over_while_frozen, "the standby did not take over while the leader was frozen"
    assert by_a == at_wake[0], "A committed after it woke"
    assert a_view["role"] == "standby", a_view
    assert b_view["role"] == "leader", b_view
    rehanded = await _assert_exactly_once(setup)
    assert a.stop() == 0, a.text()
    assert b.stop() == 0, b.text()
    kit.table.add(
        "replicas on PostgreSQL: leader frozen (SIGSTOP) longer than its lease",
        f"{FROZEN_SECONDS:g} s stopped, lease {LEASE_SECONDS:g} s (the default), retry "
        f"{LEADER_RETRY_SECONDS:g} s, {SPANS:,} spans",
        f"the standby ended A's sessions and committed {takeover:.1f} s after the stop; "
        f"drained to the last key {drained:.0f} s after it; A after waking: 0 commits (fenced), "
        f"standby; committed A {by_a:,} + B {by_b:,} = {SPANS:,}, 0 twice; {rehanded} re-handed",
    )
