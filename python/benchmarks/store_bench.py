"""Store benchmark: the poller draining Junjo-shaped spans from the Go peer into DuckDB.

Seeds a WAL with `walseed -shape junjo` (a workflow span and 4 node spans per trace, two
`set_state` events a node, state JSON of a few hundred bytes), starts our AuthServer (with
API keys in SQLite) and `ingestion-peer` on that WAL, then, in this one process as `serve`
runs them (one event loop for auth and the poller):

  count-only  SpanPoller with the count-only sink (SPAN_STORE=none) over the whole WAL
  store       SpanPoller with the DuckDB store over the same WAL, from an empty file, while
              `authload` (grpc-go, as the ingestion-service calls) validates keys at 16
              callers; RSS of this process and of any worker processes it started sampled
              throughout

Reported: spans/s into the store, its ratio to the count-only drain, auth p99 while
storing, peak RSS while storing. Bars (issue 18): >= 10,000 spans/s, auth p99 <= 20 ms, RSS
<= 400 MB (for 1,000,000 spans). Bounded: every phase has a time limit; it stops by itself.
Figures are printed and written to bench-results/store.json.

    uv run --no-sync python benchmarks/store_bench.py [--spans 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import duckdb

from junjo_backend.auth.key_store import create_api_key
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.poller.loop import SpanPoller
from junjo_backend.settings import Settings
from junjo_backend.store_wiring import build_span_store

# Run as a file (`python python/benchmarks/store_bench.py`): the shared harness is in python/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.go_tools import go_tool
from harness.peer import Peer, PeerPorts
from harness.waiting import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench-results" / "store.json"

PHASE_LIMIT_SECONDS = 600.0
SPANS_PER_TRACE = 5  # walseed -shape junjo
AUTH_CALLERS = 16
AUTH_KEYS = 20
# authload starts this long after the store drain does, and runs for at most this share of
# the drain's expected length (from the count-only rate and the store bar), so that every
# call it times falls while the store writes.
AUTH_DELAY_SECONDS = 1.0
AUTH_MAX_SECONDS = 20.0

# A million spans' indexes need about 1 GB of DuckDB memory (docs/design/span-store.md).
DEFAULT_MEMORY_LIMIT = "1500MB"

BAR_SPANS_PER_S = 10_000.0
BAR_AUTH_P99_MS = 20.0
BAR_RSS_MB = 400.0


@dataclass
class Figures:
    """Everything measured in one run."""

    spans: int
    seed_seconds: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    auth: dict[str, Any] = field(default_factory=dict)
    rss_peak_mb: float = 0.0
    rss_baseline_mb: float = 0.0
    store_bytes: int = 0
    workers: int = 0
    notes: list[str] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)


def _rss_mb(pid: int) -> float:
    with Path(f"/proc/{pid}/statm").open(encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _python_descendants(pid: int) -> list[int]:
    """Child processes (recursively) running this interpreter: the store's workers, if any.

    The Go peer and authload are children too, and are not counted.
    """
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                child_pid = int(child)
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child_pid}/exe").resolve() == Path(sys.executable).resolve():
                        found.append(child_pid)
                found.extend(_python_descendants(child_pid))
    return found


class RssSampler:
    """Samples RSS (this process + its Python workers) every 50 ms on a thread; keeps the peak.

    It runs in the benchmarked process and takes the GIL: the workers are looked for once a
    second (a walk of /proc), and each sample reads only their statm files.
    """

    def __init__(self) -> None:
        self.peak = 0.0
        self.workers: set[int] = set()
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self, *, look_for_workers: bool = True) -> float:
        """RSS now, in MB."""
        if look_for_workers:
            self._pids = _python_descendants(os.getpid())
            self.workers.update(self._pids)
        total = _rss_mb(os.getpid())
        for pid in self._pids:
            with contextlib.suppress(OSError):
                total += _rss_mb(pid)
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        samples = 0
        while not self._stop.wait(0.05):
            samples += 1
            self.sample(look_for_workers=samples % 20 == 0)

    def __enter__(self) -> Self:
        """Start sampling."""
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop sampling, with a last sample."""
        self._stop.set()
        self._thread.join()
        self.sample()


def seed_wal(wal: Path, spans: int) -> dict[str, Any]:
    """Junjo-shaped traces with walseed; its JSON answer."""
    done = subprocess.run(
        [
            str(go_tool("walseed", rebuild=True)),
            "-path",
            str(wal),
            "-count",
            str(spans),
            "-shape",
            "junjo",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=PHASE_LIMIT_SECONDS,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def drain(settings: Settings, workdir: Path, last_key: bytes, name: str) -> SpanPoller:
    """A poller over the whole WAL (from an empty checkpoint) until it has passed `last_key`."""
    url = f"sqlite+aiosqlite:///{workdir / f'{name}.db'}"
    settings = settings.model_copy(update={"database_url": url})  # its leader lock beside it
    engine = create_engine(url)
    await init_schema(engine)
    try:
        async with IngestionClient(settings=settings) as client:
            poller = SpanPoller(
                client, engine, settings=settings, store=build_span_store(settings).store
            )
            await poller.start()
            try:
                async with asyncio.timeout(PHASE_LIMIT_SECONDS):
                    while poller.status.last_key != last_key:  # noqa: ASYNC110 (polling a status)
                        await asyncio.sleep(0.005)
            finally:
                await poller.stop()
    finally:
        await close_engine(engine)
    return poller


async def authload(address: str, keys_file: Path, seconds: float) -> dict[str, Any]:
    """Authload at AUTH_CALLERS callers for `seconds`, after AUTH_DELAY_SECONDS."""
    await asyncio.sleep(AUTH_DELAY_SECONDS)
    proc = await asyncio.create_subprocess_exec(
        str(go_tool("authload")),
        f"-addr={address}",
        f"-keys={keys_file}",
        f"-duration={seconds:.1f}s",
        f"-concurrency={AUTH_CALLERS}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"authload failed: {err.decode().strip()}")
    report: dict[str, Any] = json.loads(out)
    return report


async def measure(  # noqa: PLR0917 (the run's surroundings)
    base: dict[str, object],
    workdir: Path,
    last_key: bytes,
    auth: AuthServer,
    figures: Figures,
    memory_limit: str,
) -> None:
    """The count-only drain, then the store drain under auth load."""
    count_only = Settings.model_validate({**base, "span_store": "none"})
    started = time.perf_counter()
    poller = await drain(count_only, workdir, last_key, "count-only")
    figures.seconds["count_only"] = time.perf_counter() - started
    figures.counts["count_only"] = poller.status.spans_processed
    figures.rates["count_only"] = figures.counts["count_only"] / figures.seconds["count_only"]
    print(f"  count-only {figures.rates['count_only']:>10,.0f} spans/s", flush=True)

    store_file = workdir / "otel_data.db"
    storing = Settings.model_validate(
        {
            **base,
            "span_store": "duckdb",
            "span_store_duckdb_path": str(store_file),
            "span_store_duckdb_memory_limit": memory_limit,
        }
    )
    expected = figures.spans / BAR_SPANS_PER_S  # at the bar; faster ends sooner
    auth_seconds = max(2.0, min(AUTH_MAX_SECONDS, expected * 0.5))
    keys_file = workdir / "keys.txt"
    with RssSampler() as sampler:
        figures.rss_baseline_mb = sampler.sample()
        started = time.perf_counter()
        load = asyncio.create_task(authload(auth.address, keys_file, auth_seconds))
        poller = await drain(storing, workdir, last_key, "store")
        figures.seconds["store"] = time.perf_counter() - started
        figures.auth = await load
    figures.rss_peak_mb = sampler.peak
    figures.workers = len(sampler.workers)
    figures.counts["store"] = poller.status.spans_processed
    figures.rates["store"] = figures.counts["store"] / figures.seconds["store"]
    auth_end = AUTH_DELAY_SECONDS + float(figures.auth["seconds"])
    if auth_end > figures.seconds["store"]:
        figures.notes.append(
            f"authload ran {auth_end:.1f} s, past the store drain's "
            f"{figures.seconds['store']:.1f} s"
        )
    print(f"  store      {figures.rates['store']:>10,.0f} spans/s", flush=True)
    with contextlib.closing(duckdb.connect(str(store_file), read_only=True)) as db:
        row = db.execute("SELECT count(*) FROM spans").fetchone()
        figures.counts["store_rows"] = int(row[0]) if row else 0
    figures.store_bytes = store_file.stat().st_size


def report(figures: Figures) -> dict[str, Any]:
    """Print the figures against the bars; the JSON document."""
    store = figures.rates.get("store", 0.0)
    ratio = store / figures.rates["count_only"] if figures.rates.get("count_only") else None
    p99 = float(figures.auth.get("p99_ms", float("inf")))
    checks = {
        "spans_per_s": store >= BAR_SPANS_PER_S,
        "auth_p99_ms": p99 <= BAR_AUTH_P99_MS,
        "rss_mb": figures.rss_peak_mb <= BAR_RSS_MB,
    }
    print(
        f"\nstore drain, {figures.spans:,} Junjo-shaped spans "
        f"(walseed {figures.seed_seconds:.0f} s)"
    )
    print(f"  count-only drain   {figures.rates.get('count_only', 0):>10,.0f} spans/s")
    print(f"  into DuckDB        {store:>10,.0f} spans/s  ({ratio or 0:.2f}x the count-only drain)")
    print(f"  rows in spans      {figures.counts.get('store_rows', 0):>10,}")
    print(f"  store file         {figures.store_bytes / 2**20:>10,.0f} MB")
    print("\nbars (issue 18)")
    for label, value, passed in (
        (
            f"spans/s into the store >= {BAR_SPANS_PER_S:,.0f}",
            f"{store:,.0f}",
            checks["spans_per_s"],
        ),
        (
            f"auth p99 at {AUTH_CALLERS} callers while storing <= {BAR_AUTH_P99_MS:g} ms",
            f"{p99:.2f} ms",
            checks["auth_p99_ms"],
        ),
        (
            f"RSS while storing <= {BAR_RSS_MB:g} MB",
            f"{figures.rss_peak_mb:.0f} MB",
            checks["rss_mb"],
        ),
    ):
        print(f"  {label:<48}{value:>12}  {'ok' if passed else 'MISSED'}")
    print(
        f"    (auth: {figures.auth.get('rps', 0):,.0f} calls/s, p50 "
        f"{figures.auth.get('p50_ms', 0):.2f} ms, errors {figures.auth.get('errors')}, wrong "
        f"{figures.auth.get('wrong_answers')}; RSS {figures.rss_baseline_mb:.0f} MB before, "
        f"{figures.workers} worker processes)"
    )
    print(f"load average (1, 5, 15 min) before and after: {figures.load_average}")
    for note in figures.notes:
        print(f"note: {note}")
    return {
        "benchmark": "store",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15_min_before_and_after": figures.load_average,
        },
        "wal_entries": figures.spans,
        "walseed_seconds": round(figures.seed_seconds, 1),
        "spans_per_s": {name: round(rate) for name, rate in figures.rates.items()},
        "store_vs_count_only": ratio,
        "seconds": {name: round(value, 2) for name, value in figures.seconds.items()},
        "counts": figures.counts,
        "auth_while_storing": figures.auth,
        "rss_mb": {"baseline": round(figures.rss_baseline_mb), "peak": round(figures.rss_peak_mb)},
        "worker_processes": figures.workers,
        "store_file_bytes": figures.store_bytes,
        "bars": {
            "spans_per_s": BAR_SPANS_PER_S,
            "auth_p99_ms": BAR_AUTH_P99_MS,
            "rss_mb": BAR_RSS_MB,
        },
        "met": checks,
        "notes": figures.notes,
    }


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark."""
    go_tool("authload")  # built now, if `make peer` has not, rather than mid-measurement
    figures = Figures(spans=arguments.spans - arguments.spans % SPANS_PER_TRACE)
    figures.load_average = [round(load, 2) for load in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        started = time.perf_counter()
        seeded = await asyncio.to_thread(seed_wal, workdir / "wal", figures.spans)
        figures.seed_seconds = time.perf_counter() - started
        last_key = bytes.fromhex(seeded["last_key"])

        auth_settings = Settings.model_validate(
            {
                "database_url": f"sqlite+aiosqlite:///{workdir / 'auth.db'}",
                "auth_grpc_listen_address": "127.0.0.1:0",
            }
        )
        auth_engine = create_engine(auth_settings.database_url)
        await init_schema(auth_engine)
        keys = [(await create_api_key(auth_engine, f"bench-{n}")).key for n in range(AUTH_KEYS)]
        (workdir / "keys.txt").write_text("\n".join(keys) + "\n")
        auth = AuthServer(auth_settings, auth_engine)
        await auth.start()
        public, internal = free_ports(2)
        ports = PeerPorts(public, internal, backend=int(auth.address.rsplit(":", 1)[1]))
        peer = Peer(ports, workdir / "wal", binary=go_tool("ingestion-peer"), log_level="info")
        try:
            await asyncio.to_thread(peer.start)
            await asyncio.to_thread(peer.wait_serving)
            base: dict[str, object] = {"ingestion_grpc_address": peer.internal_address}
            print(f"peer at {peer.internal_address}; draining {figures.spans:,} spans twice")
            await measure(base, workdir, last_key, auth, figures, arguments.memory_limit)
            figures.notes.append(f"SPAN_STORE_DUCKDB_MEMORY_LIMIT={arguments.memory_limit}")
        finally:
            peer.stop()
            await auth.stop(0)
            await close_engine(auth_engine)
        for name in ("count_only", "store", "store_rows"):
            if figures.counts.get(name) != figures.spans:
                figures.notes.append(
                    f"{name}: {figures.counts.get(name)} spans, not {figures.spans}"
                )
        figures.load_average += [round(load, 2) for load in os.getloadavg()]
        return report(figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    """Parse the options, run, write bench-results/store.json."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spans", type=int, default=1_000_000, help="WAL entries to seed and drain"
    )
    parser.add_argument(
        "--memory-limit",
        default=DEFAULT_MEMORY_LIMIT,
        help="DuckDB's memory_limit for the store (its indexes need ~600 B a span: "
        "docs/design/span-store.md; the 256MB default holds ~360,000 spans)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    arguments = parser.parse_args()
    document = asyncio.run(run(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {arguments.output}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
