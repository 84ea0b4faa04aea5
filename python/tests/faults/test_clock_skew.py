"""The backend's clock 5 s ahead of the ingestion-service's, and 5 s behind, under load.

`junjo-backend serve` runs under libfaketime (`LD_PRELOAD`, `FAKETIME=+5s` or `-5s`, in its
environment only); the Go peer and this test keep the host's clock, so the peer's keys carry
the true time. `DONT_FAKE_MONOTONIC=1`: a host with a wrong wall clock still has a right
monotonic one (and `FAKETIME_FORCE_MONOTONIC_FIX=0`, see below); the poller's settle
horizon rests on its monotonic clock and the keys (docs/design/settle-window.md).
Concurrent OTLP load (otlpload, paced below the drain's speed) commits entries out of key
order, as the real ingestion-service does. Expected: no span lost (the WAL's census through
the peer's walseed), no skip reported, and no wait of the skew's size.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.auth.postgres_binaries import in_ci

from .ingest_helpers import ServeBackend, percentile, run_go_tool
from .test_ingest import sample_lag, settled_count

if TYPE_CHECKING:
    from .conftest import FaultKit, GoPeer

SPANS = 200_000
STREAMS = 4
SETTLE_SECONDS = 1.0  # POLLER_SETTLE_SECONDS's default, set so the row states it
SKEW_SECONDS = 5
# Paced below what the drain sustains beside the peer and the load on 2 cores (~40,000/s at
# full speed): the lag is then the settle window's and the read cadence's, not throughput's,
# and the row can show it within W plus a second. Four streams still commit out of key order.
RATE = 20_000


def _libfaketime() -> str:
    """Debian's libfaketime (apt-get install faketime libfaketime; .ci/run installs it)."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        reason = "libfaketime is not installed (apt-get install -y faketime libfaketime)"
        if in_ci():
            pytest.fail(f"{reason}; CI=true: the clock-skew row must run")
        pytest.skip(reason)
    return str(found[0])


def _faked_clock_offset(env: dict[str, str]) -> tuple[float, float]:
    """(wall, monotonic) clock of a Python process under `env`, minus this process's."""
    probe = "import time; print(time.time(), time.monotonic())"
    before_wall, before_mono = time.time(), time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    return float(out[0]) - before_wall, float(out[1]) - before_mono


@pytest.mark.parametrize("skew", [SKEW_SECONDS, -SKEW_SECONDS], ids=["ahead", "behind"])
async def test_a_skewed_backend_clock_loses_no_span_and_adds_no_wait(
    kit: FaultKit, go_peer: GoPeer, skew: int
) -> None:
    faked = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME": f"{skew:+d}s",
        "DONT_FAKE_MONOTONIC": "1",
        # libfaketime 0.9.10 otherwise rewrites pthread_cond_timedwait deadlines (its
        # "monotonic fix"): a thread start then took ~100 ms here, and the backend crawled.
        "FAKETIME_FORCE_MONOTONIC_FIX": "0",
    }
    wall, mono = _faked_clock_offset(faked)
    # The fault is in place: the wall clock moved, the monotonic one did not.
    assert abs(wall - skew) < 1.0, wall
    assert abs(mono) < 1.0, mono
    ports = go_peer.ports()
    [key] = await kit.store_keys(kit.sqlite_url(), 1, "faults: clock skew")
    backend = ServeBackend(
        kit,
        auth_port=ports.backend,
        ingestion_address=f"127.0.0.1:{ports.internal}",
        name=f"serve-clock-{'ahead' if skew > 0 else 'behind'}",
        # SPAN_STORE=none: the row is about the settle window; a sink that counts is enough.
        env={**faked, "POLLER_SETTLE_SECONDS": str(SETTLE_SECONDS), "SPAN_STORE": "none"},
    )
    wal_dir = kit.folder / "wal"
    lags: list[float] = []
    await backend.start().wait_ready()
    peer = await go_peer.fleet.launch(ports, wal_dir=wal_dir, wait=False)
    await peer.wait_serving(timeout=120)
    try:
        sampling = asyncio.create_task(sample_lag(backend, lags))
        load = await asyncio.to_thread(
            run_go_tool,
            "otlpload",
            [
                f"-addr={peer.public_address}",
                f"-streams={STREAMS}",
                "-batch=512",
                f"-spans={SPANS}",
                f"-rate={RATE}",
            ],
            kit.output.path(f"otlpload-clock-{skew:+d}"),
            OTLPLOAD_API_KEY=key,
        )
        sampling.cancel()
        assert load["errors"] == {}, load
        final = await settled_count(backend, load["spans_accepted"])
    finally:
        await backend.stop_async()
        await peer.stop()  # gracefully: the WAL is synced and closed
    census = await asyncio.to_thread(
        run_go_tool, "walseed", [f"-path={wal_dir}", "-census"], kit.output.path("census-clock")
    )
    assert census["entries"] == load["spans_accepted"] == SPANS
    assert final.spans_processed == census["entries"], (
        f"{census['entries'] - final.spans_processed} spans lost"
    )
    assert final.entries_skipped == 0
    assert final.last_error is None
    assert "do not decode" not in backend.text()  # no false skip warning
    if skew < 0:
        # Sampled by this (true) clock: a horizon on this host's clock made every span wait
        # the skew on top of the window (and of the drain's own lag, a few seconds here).
        assert percentile(lags, 0.5) < abs(skew) + SETTLE_SECONDS, lags
    kit.table.add(
        f"backend clock {skew:+d} s from the ingestion-service's (libfaketime), concurrent "
        f"OTLP load ({STREAMS} streams x 512, paced at {RATE:,} spans/s)",
        f"{SPANS:,} spans",
        f"0 lost of {census['entries']:,} (WAL census), entries_skipped 0, no skip warning; "
        f"W={SETTLE_SECONDS:g} s; lag under load by the true clock median "
        f"{percentile(lags, 0.5):.1f} s, p90 {percentile(lags, 0.9):.1f} s, max "
        f"{max(lags):.1f} s against W + 1 s = {SETTLE_SECONDS + 1:g} s "
        f"({load['accepted_per_s']:,.0f} spans/s accepted)",
    )
