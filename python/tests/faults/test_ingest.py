"""Ingestion faults: out-of-order commits under concurrent OTLP load, and runs of entries the
ingestion-service cannot decode. `junjo-backend serve` runs as a subprocess; the Go peer runs
in its container and validates the load's API key against that backend."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .ingest_helpers import ServeBackend, percentile, run_go_tool

if TYPE_CHECKING:
    from .conftest import FaultKit, GoPeer
    from .ingest_helpers import PollerView

RUNS = 3
SPANS_PER_RUN = 1_000_000
STREAMS = 4
SETTLE_SECONDS = 1.0  # POLLER_SETTLE_SECONDS's default, set explicitly so the row states it
# After the load, a poller that lost entries stays short of the count forever: it is taken
# as final once caught up and unchanged for this long (more than the settle window plus an
# idle wait and a read).
STABLE_SECONDS = 4.0


async def test_concurrent_ingest_loses_no_span(kit: FaultKit, go_peer: GoPeer) -> None:
    ports = go_peer.ports()
    [key] = await kit.store_keys(kit.sqlite_url(), 1, "faults: concurrent ingest")
    backend = ServeBackend(
        kit,
        auth_port=ports.backend,
        ingestion_address=f"127.0.0.1:{ports.internal}",
        name="serve-concurrent-ingest",
        # The drain at full speed: the count-only sink (the store's own row is in
        # test_store_faults.py).
        env={"POLLER_SETTLE_SECONDS": str(SETTLE_SECONDS), "SPAN_STORE": "none"},
    )
    wal_dir = kit.folder / "wal"
    accepted = 0
    runs: list[str] = []
    lags: list[float] = []
    catch_ups: list[float] = []
    await backend.start().wait_ready()
    peer = await go_peer.fleet.launch(ports, wal_dir=wal_dir, wait=False)
    await peer.wait_serving(timeout=120)
    try:
        for run in range(1, RUNS + 1):
            sampled: list[float] = []
            sampling = asyncio.create_task(sample_lag(backend, sampled))
            load = await asyncio.to_thread(
                run_go_tool,
                "otlpload",
                [
                    f"-addr={peer.public_address}",
                    f"-streams={STREAMS}",
                    "-batch=512",
                    f"-spans={SPANS_PER_RUN}",
                ],
                kit.output.path(f"otlpload-run-{run}"),
                OTLPLOAD_API_KEY=key,
            )
            sampling.cancel()
            assert load["errors"] == {}, load
            assert load["spans_accepted"] == SPANS_PER_RUN
            accepted += load["spans_accepted"]
            final = await settled_count(backend, accepted)
            catch_up = time.time() - load["last_accept_unix_ms"] / 1000
            assert final.last_error is None
            assert final.spans_processed == accepted, (
                f"run {run}: {accepted - final.spans_processed} spans missing"
            )
            lags.extend(sampled)
            catch_ups.append(catch_up)
            runs.append(
                f"{load['spans_accepted']:,} at {load['accepted_per_s']:,.0f}/s, "
                f"lag median {percentile(sampled, 0.5):.1f} s"
            )
    finally:
        await backend.stop_async()
        await peer.stop()  # gracefully: the WAL is synced and closed
    census = await asyncio.to_thread(
        run_go_tool,
        "walseed",
        [f"-path={wal_dir}", "-census"],
        kit.output.path("walseed-census"),
    )
    assert census["entries"] == accepted

    kit.table.add(
        f"concurrent OTLP ingest ({STREAMS} streams x 512) while the poller drains",
        f"{RUNS} x {SPANS_PER_RUN:,} spans",
        f"0 missing of {accepted:,} (WAL census {census['entries']:,}); "
        f"W={SETTLE_SECONDS:g} s; ingest-to-processing lag under load median "
        f"{percentile(lags, 0.5):.1f} s, p90 {percentile(lags, 0.9):.1f} s; caught up "
        f"{min(catch_ups):.1f}-{max(catch_ups):.1f} s after the last accept; "
        f"runs: {'; '.join(runs)}",
    )


async def sample_lag(backend: ServeBackend, into: list[float]) -> None:
    """Every half second, the age of the newest processed span (now minus its key time)."""
    while True:
        view = await backend.poller()
        if view is not None and view.last_key_received_at is not None:
            into.append(time.time() - view.last_key_received_at)
        await asyncio.sleep(0.5)


async def settled_count(backend: ServeBackend, expected: int) -> PollerView:
    """The poller's state once it has processed `expected`, or has stopped short of it."""
    stable_since = time.monotonic()
    last = -1

    def done(view: PollerView) -> bool:
        nonlocal stable_since, last
        if view.spans_processed != last or not view.caught_up:
            last = view.spans_processed
            stable_since = time.monotonic()
        return view.spans_processed >= expected or (
            time.monotonic() - stable_since >= STABLE_SECONDS
        )

    return await backend.wait_for_poller(done, limit=180)


async def test_corrupt_run_is_drained_past(kit: FaultKit, go_peer: GoPeer) -> None:
    # The case: POLLER_BATCH_SIZE=5 (reads of 500), 600 undecodable entries between
    # 1,000 valid ones and 1,000 more.
    valid, corrupt, before = 2000, 600, 1000
    wal_dir = kit.folder / "wal"
    seeded = await asyncio.to_thread(
        run_go_tool,
        "walseed",
        [
            f"-path={wal_dir}",
            f"-count={valid}",
            f"-corrupt={corrupt}",
            f"-corrupt-after={before}",
        ],
        kit.output.path("walseed-corrupt-run"),
    )
    seeded_at = time.monotonic()
    ports = go_peer.ports()
    await kit.store_keys(kit.sqlite_url(), 1, "faults: corrupt run")
    settle = 0.2
    backend = ServeBackend(
        kit,
        auth_port=ports.backend,
        ingestion_address=f"127.0.0.1:{ports.internal}",
        name="serve-corrupt-run",
        env={
            "POLLER_BATCH_SIZE": "5",
            "POLLER_SETTLE_SECONDS": str(settle),
            "POLLER_IDLE_WAIT_SECONDS": "0.2",
        },
    )
    # Every seeded entry is out of the settle window before the poller reads: a stop there
    # would be caught up by definition, and this test is about the end of the WAL.
    await asyncio.sleep(max(0.0, settle - (time.monotonic() - seeded_at)))
    early: list[PollerView] = []
    await backend.start().wait_ready()
    peer = await go_peer.fleet.launch(ports, wal_dir=wal_dir, wait=False)
    await peer.wait_serving(timeout=120)
    try:

        def at_the_end(view: PollerView) -> bool:
            if view.caught_up and view.spans_processed < valid:
                early.append(view)
            return view.caught_up and view.spans_processed >= valid

        final = await backend.wait_for_poller(at_the_end, limit=60, every=0.02)
        # Caught up must stay true, and nothing more arrives.
        await asyncio.sleep(1.0)
        again = await backend.poller()
    finally:
        await backend.stop_async()
        await peer.stop()  # gracefully: the WAL is synced and closed

    assert early == []
    assert final.spans_processed == valid
    assert final.last_key == seeded["last_key"]
    assert again is not None
    assert again.caught_up
    assert again.spans_processed == valid
    # Reported where the reads prove it: the window of 500 that held only skipped entries.
    assert 0 < final.entries_skipped <= corrupt
    kit.table.add(
        "run of undecodable WAL entries (POLLER_BATCH_SIZE=5)",
        f"{corrupt} corrupt between {before:,} and {valid - before:,} valid",
        f"drained past: {final.spans_processed:,} of {valid:,} processed, checkpoint at the "
        f"last valid key, caught_up never true before the end; skipped reported "
        f"{final.entries_skipped} of {corrupt} (a lower bound: the largest read's skips are "
        "invisible on the wire)",
    )
