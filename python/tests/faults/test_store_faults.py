"""The span store under faults: `junjo-backend serve` with its DuckDB store, the real Go peer.

- SIGKILL between the store's commit and the checkpoint's, again and again (the test-only
  setting TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS aims the kill there): the span and patch
  rows are exactly those of an uninterrupted run on the same WAL.
- The store file deleted while the backend is stopped: the restart refills it to the WAL's
  count.
- Poison: every golden bad case mixed into 100,000 good spans: every good one stored, every
  bad one set aside, and the poller never stalls.
- Disk full: the store on a tiny tmpfs; the batch fails and is retried, the checkpoint does
  not move, and once space returns nothing is missing.

The WAL is filled with walseed (Junjo-shaped spans) while the peer is stopped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from harness.waiting import NeverHappenedError, wait_until
from tests.store_wiring.store_files import (
    PATCHES_PER_TRACE,
    SPANS_PER_TRACE,
    Seeded,
    junjo_traces,
    store_rows,
    walseed,
)

from .ingest_helpers import run_go_tool
from .store_helpers import (
    DRAIN_LIMIT_SECONDS,
    StoreBackend,
    mount_tmpfs,
    rows_differing,
    store_watermark,
    unmount,
)

if TYPE_CHECKING:
    from harness.peer import PeerPorts

    from .conftest import FaultKit, GoPeer

GOLDEN = Path(__file__).parents[1] / "store" / "golden" / "batches.jsonl"
# The golden batches whose cases the Go backend could not store (golden README).
BAD_BATCHES = range(24, 30)
# 10 batches; each run dies at its 4th store commit, 3 batches further on: 3 kills.
KILL_TRACES = 2_000  # 10,000 spans
KILL_BATCH = 1_000
KILL_AFTER_COMMITS = 4
MAX_RUNS = 12
# Hang guard of the scenarios that restart `serve` several times (a loaded machine takes
# seconds to start one).
SCENARIO_TIMEOUT_SECONDS = 900
GONE_TRACES = 2_000
POISON_GOOD = 100_000
POISON_ROUNDS = 2
DISK_FULL_TRACES = 4_000  # 20,000 spans: more than the small tmpfs holds
DISK_FULL_SIZE = "4m"
DISK_ROOMY_SIZE = "256m"
DISK_FULL_FAILURES = 3
DISK_FULL_HOLD_SECONDS = 3.0
# Sized to what the store sustains (the full-speed rows, test_ingest.py, run count-only).
INGEST_SPANS = 100_000
INGEST_STREAMS = 4


def _backend(
    folder: Path,
    ports: PeerPorts,
    kit: FaultKit,
    name: str,
    *,
    store: Path | None = None,
    env: dict[str, str] | None = None,
) -> StoreBackend:
    return StoreBackend(folder, ports, kit, name, store=store, env=env)


@pytest.mark.timeout(SCENARIO_TIMEOUT_SECONDS)
async def test_sigkill_between_the_store_commit_and_the_checkpoint(
    kit: FaultKit, go_peer: GoPeer
) -> None:
    ports = go_peer.ports()
    seeded = junjo_traces(kit.folder / "wal", KILL_TRACES)
    batch = {"POLLER_BATCH_SIZE": str(KILL_BATCH)}
    reference = _backend(kit.folder / "a", ports, kit, "store-reference", env=batch)
    killed = _backend(
        kit.folder / "b",
        ports,
        kit,
        "store-killed",
        env={**batch, "TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS": str(KILL_AFTER_COMMITS)},
    )
    kills = 0
    try:
        reference.start()
        await reference.wait_ready()
        await go_peer.fleet.launch(ports, wal_dir=kit.folder / "wal")
        await reference.wait_stored(seeded.last_key)
        assert reference.stop() == 0, reference.output()

        started = time.monotonic()
        for _run in range(MAX_RUNS):
            killed.start()
            status: int | None = None

            def ended() -> bool:
                nonlocal status
                status = killed.exit_status()
                return status is not None or killed.checkpoint() == seeded.last_key

            await wait_until(ended, "a kill, or the drain's end", limit=120)
            if status is None:  # the last run: fewer commits left than the kill needs
                break
            assert status == -signal.SIGKILL, killed.output()
            watermark, checkpoint = store_watermark(killed.store), killed.checkpoint()
            # The kill fell between the two commits: the store holds a batch the
            # checkpoint does not.
            assert watermark is not None
            assert checkpoint is None or watermark > checkpoint
            kills += 1
        else:
            raise AssertionError(f"not drained after {MAX_RUNS} runs")
        await killed.wait_stored(seeded.last_key)
        elapsed = time.monotonic() - started
        assert killed.stop() == 0, killed.output()
    finally:
        reference.close()
        killed.close()

    assert kills >= 3, f"only {kills} kills"
    differing = rows_differing(reference.store, killed.store)
    rows = store_rows(killed.store)
    assert differing == {"spans": 0, "state_patches": 0}, differing
    assert rows.spans == rows.distinct_spans == seeded.count
    assert rows.patches == KILL_TRACES * PATCHES_PER_TRACE
    assert store_rows(reference.store) == rows
    kit.table.add(
        "SIGKILL between the span store's commit and the checkpoint's (test-only setting)",
        f"{kills} kills, {seeded.count:,} spans",
        f"every kill left the store 1 batch ahead of the checkpoint; span and patch rows "
        f"equal an uninterrupted run's ({rows.spans:,} spans, {rows.patches:,} patches, "
        f"0 rows differ either way); {elapsed:.0f} s",
    )


@pytest.mark.timeout(SCENARIO_TIMEOUT_SECONDS)
async def test_a_store_file_deleted_while_stopped_is_refilled(
    kit: FaultKit, go_peer: GoPeer
) -> None:
    ports = go_peer.ports()
    seeded = junjo_traces(kit.folder / "wal", GONE_TRACES)
    backend = _backend(kit.folder / "backend", ports, kit, "store-gone")
    try:
        backend.start()
        await backend.wait_ready()
        await go_peer.fleet.launch(ports, wal_dir=kit.folder / "wal")
        await backend.wait_stored(seeded.last_key)
        assert backend.stop() == 0, backend.output()
        before = store_rows(backend.store)
        for path in (backend.store, backend.store.with_name(backend.store.name + ".wal")):
            path.unlink(missing_ok=True)

        backend.start()
        await backend.wait_ready()
        refill = await backend.wait_stored(seeded.last_key)
        section = await backend.store_health()
        assert backend.stop() == 0, backend.output()
    finally:
        backend.close()

    rows = store_rows(backend.store)
    assert rows == before
    assert rows.spans == rows.distinct_spans == seeded.count == section["spans_stored"]
    assert rows.patches == GONE_TRACES * PATCHES_PER_TRACE
    kit.table.add(
        "span store file deleted while the backend is stopped",
        f"{seeded.count:,} spans",
        f"refilled from the WAL to its count on restart ({rows.spans:,} spans, "
        f"{rows.patches:,} patches, the same rows as before); {refill:.0f} s",
    )


def _golden_lines(batches: range) -> list[str]:
    lines = GOLDEN.read_text(encoding="utf-8").splitlines()
    return [lines[number - 1] for number in batches]


def _golden_ids(lines: list[str]) -> list[tuple[str, str]]:
    """(trace_id, span_id) in hex of every record of these golden lines."""
    ids = []
    for line in lines:
        for record in json.loads(line)["records"]:
            span = trace_pb2.Span.FromString(base64.b64decode(record["span"]))
            ids.append((span.trace_id.hex(), span.span_id.hex()))
    return ids


def _expected_golden_ids() -> set[tuple[str, str]]:
    """The spans the golden files say are stored."""
    expected = GOLDEN.with_name("expected-spans.jsonl").read_text(encoding="utf-8")
    return {(row["trace_id"], row["span_id"]) for row in map(json.loads, expected.splitlines())}


@pytest.mark.timeout(SCENARIO_TIMEOUT_SECONDS)
async def test_poison_mixed_into_good_spans(kit: FaultKit, go_peer: GoPeer) -> None:
    bad_lines = _golden_lines(BAD_BATCHES)
    bad_file = kit.folder / "bad.jsonl"
    bad_file.write_text("\n".join(bad_lines) + "\n", encoding="utf-8")
    bad_ids = set(_golden_ids(bad_lines))
    stored_bad = bad_ids & _expected_golden_ids()
    set_aside_bad = bad_ids - stored_bad
    wal = kit.folder / "wal"
    seeded: list[Seeded] = []
    for _round in range(POISON_ROUNDS):  # good spans, then every bad case, twice
        seeded.append(junjo_traces(wal, POISON_GOOD // POISON_ROUNDS // SPANS_PER_TRACE))
        seeded.append(walseed(wal, "-records", str(bad_file)))
    ports = go_peer.ports()
    backend = _backend(kit.folder / "backend", ports, kit, "store-poison")
    try:
        backend.start()
        await backend.wait_ready()
        await go_peer.fleet.launch(ports, wal_dir=wal)
        elapsed = await backend.wait_stored(seeded[-1].last_key)
        section = await backend.store_health()
        assert backend.stop() == 0, backend.output()
    finally:
        backend.close()

    failed = backend.count_in_output("span poller batch failed")
    with contextlib.closing(duckdb.connect(str(backend.store), read_only=True)) as db:
        spans = set(db.execute("SELECT trace_id, span_id FROM spans").fetchall())
        good = db.execute(
            "SELECT count(*) FROM spans WHERE name = 'workflow' OR name LIKE 'node-%'"
        ).fetchone()
        aside = db.execute("SELECT trace_id, span_id, reason FROM junjo_spans_set_aside").fetchall()
    whole_spans_aside = [(t, s) for t, s, reason in aside if not reason.startswith("patch of")]
    assert good is not None
    assert good[0] == POISON_GOOD
    assert len(spans) == POISON_GOOD + len(stored_bad)
    assert stored_bad <= spans
    assert not set_aside_bad & spans
    # Each bad span is set aside each time it comes, with a reason; nothing else is.
    assert sorted(whole_spans_aside) == sorted(list(set_aside_bad) * POISON_ROUNDS)
    assert all(reason for _t, _s, reason in aside)
    assert section["set_aside"] == len(aside)
    assert failed == 0, "a batch failed: poison stalled the poller"
    kit.table.add(
        "poison: every golden bad case mixed into good spans",
        f"{len(bad_ids)} bad spans x {POISON_ROUNDS} among {POISON_GOOD:,} good",
        f"every good span stored; the {len(set_aside_bad)} spans Go could not store set "
        f"aside each time ({len(whole_spans_aside)} rows, with reasons), "
        f"{len(aside) - len(whole_spans_aside)} bad patches set aside, "
        f"{len(stored_bad)} repaired spans stored once; 0 failed batches; {elapsed:.0f} s",
    )


@pytest.mark.timeout(SCENARIO_TIMEOUT_SECONDS)
async def test_disk_full_under_the_store(kit: FaultKit, go_peer: GoPeer) -> None:
    small = kit.folder / "small"
    mount_tmpfs(small, DISK_FULL_SIZE)
    try:
        seeded = junjo_traces(kit.folder / "wal", DISK_FULL_TRACES)
        ports = go_peer.ports()
        backend = _backend(
            kit.folder / "backend",
            ports,
            kit,
            "store-disk-full",
            store=small / "otel_data.db",
            env={"POLLER_BATCH_SIZE": "500"},
        )
        try:
            backend.start()
            await backend.wait_ready()
            await go_peer.fleet.launch(ports, wal_dir=kit.folder / "wal")
            await wait_until(
                lambda: backend.count_in_output("span poller batch failed") >= DISK_FULL_FAILURES,
                "batches fail on the full disk",
                limit=DRAIN_LIMIT_SECONDS,
            )
            held = backend.checkpoint()
            failures_before = backend.count_in_output("span poller batch failed")
            await asyncio.sleep(DISK_FULL_HOLD_SECONDS)
            # Retried all along, and the checkpoint stayed where the last stored batch left it.
            assert backend.count_in_output("span poller batch failed") > failures_before
            assert backend.checkpoint() == held
            assert held != seeded.last_key
            health = await backend.health()
            assert health is not None
            poller = health["poller"]
            assert isinstance(poller, dict)
            assert poller["last_error"]

            mount_tmpfs(small, DISK_ROOMY_SIZE)  # space returns
            recovered = await backend.wait_stored(seeded.last_key)
            failures = backend.count_in_output("span poller batch failed")
            assert backend.stop() == 0, backend.output()
        finally:
            backend.close()
        rows = store_rows(backend.store)
    finally:
        unmount(small)
    assert rows.spans == rows.distinct_spans == seeded.count
    assert rows.patches == DISK_FULL_TRACES * PATCHES_PER_TRACE
    assert rows.watermark == seeded.last_key
    kit.table.add(
        f"span store on a full disk (tmpfs of {DISK_FULL_SIZE}, then {DISK_ROOMY_SIZE})",
        f"{seeded.count:,} spans",
        f"{failures} failed batch attempts, retried; the checkpoint held still for "
        f"{DISK_FULL_HOLD_SECONDS:g} s; after space returned every span stored "
        f"({rows.spans:,}, {rows.patches:,} patches, none twice) {recovered:.1f} s later",
    )


@pytest.mark.timeout(SCENARIO_TIMEOUT_SECONDS)
async def test_concurrent_ingest_with_the_store_on(kit: FaultKit, go_peer: GoPeer) -> None:
    ports = go_peer.ports()
    backend = _backend(kit.folder / "backend", ports, kit, "store-ingest")
    (key,) = await kit.store_keys(
        f"sqlite+aiosqlite:///{backend.database}", 1, "faults: ingest with the store on"
    )
    wal = kit.folder / "wal"
    try:
        backend.start()
        await backend.wait_ready()
        peer = await go_peer.fleet.launch(ports, wal_dir=wal)
        load = await asyncio.to_thread(
            run_go_tool,
            "otlpload",
            [
                f"-addr={peer.public_address}",
                f"-streams={INGEST_STREAMS}",
                "-batch=512",
                f"-spans={INGEST_SPANS}",
                "-unique",  # the store keeps each span id once; a resent span is no new row
            ],
            kit.output.path("otlpload-store-on"),
            OTLPLOAD_API_KEY=key,
        )
        assert load["errors"] == {}, load
        accepted = int(load["spans_accepted"])
        assert accepted == INGEST_SPANS

        last: list[dict[str, object] | None] = [None]

        async def all_stored() -> bool:
            last[0] = await backend.health()
            section = (last[0] or {}).get("span_store")
            return isinstance(section, dict) and section.get("spans_stored") == accepted

        try:
            await wait_until(all_stored, "the store holds every accepted span", limit=600)
        except NeverHappenedError:
            health = last[0] or {}
            raise AssertionError(
                f"not all stored: {health.get('span_store')} {health.get('poller')}"
            ) from None
        stored_at = time.time()
        assert backend.stop() == 0, backend.output()
        await peer.stop()
    finally:
        backend.close()
    census = await asyncio.to_thread(
        run_go_tool, "walseed", [f"-path={wal}", "-census"], kit.output.path("census-store-on")
    )
    rows = store_rows(backend.store)
    assert census["entries"] == accepted
    assert rows.spans == rows.distinct_spans == accepted
    seconds = stored_at - load["first_send_unix_ms"] / 1000
    kit.table.add(
        f"concurrent OTLP ingest ({INGEST_STREAMS} streams x 512) with the span store on",
        f"{accepted:,} spans at {load['accepted_per_s']:,.0f}/s accepted",
        f"0 missing: {rows.spans:,} in DuckDB (WAL census {census['entries']:,}); all stored "
        f"{stored_at - load['last_accept_unix_ms'] / 1000:.1f} s after the last accept "
        f"({accepted / seconds:,.0f} spans/s from the first send to the last stored)",
    )
