"""Span read API latency over a store of 1,000,000 spans, idle, on DuckDB and PostgreSQL.

    uv run --no-sync python benchmarks/span_api_bench.py [--spans 1000000] [--requests 200]

The store holds traces of 200 spans (a root and 199 children) over ten services, so each
service has at least 500 roots. A server process (uvicorn, the real routes and readers:
`DuckDBStore.cursor` and `PostgresReader`) serves them on loopback; this process asks one
request at a time and reports p50/p99 of:
- `nested-spans` of a 200-span trace (a different trace each time);
- `root-spans` of a service with >= 500 roots (the newest 500).
Bar (issue 19): p99 <= 50 ms each. Results also go to bench-results/span_api.json.
Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.waiting import free_port, wait_until_sync
from junjo_backend.database import close_engine, create_engine
from junjo_backend.store import schema

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench-results" / "span_api.json"
TRACE_SPANS = 200
SERVICES = 10
BAR_MS = 50.0
_BASE_US = 1_700_000_000_000_000

# One row per (trace t, span i): span 0 is the root; times grow with t and i; the
# attributes and events are of the Junjo SDK's size (a few hundred bytes).
_ROWS_SQL = """
SELECT
  {hex32} AS trace_id, {hex16_span} AS span_id,
  CASE WHEN i = 0 THEN NULL ELSE {hex16_root} END AS parent_span_id,
  'svc-' || (t % {services})::text AS service_name, 'node-' || i::text AS name,
  'INTERNAL' AS kind, {start} AS start_time, {end} AS end_time,
  'STATUS_CODE_OK' AS status_code, '' AS status_message,
  ('{{"junjo.workflow_id":"w","k":"' || repeat('v', 250) || '"}}'){json} AS attributes_json,
  ('[{{"attributes":{{"junjo.state_json_patch":"[{{\\"op\\":\\"add\\"}}]"}},'
   || '"droppedAttributesCount":0,"name":"set_state","timeUnixNano":1}}]'){json} AS events_json,
  '[]'{json} AS links_json, 1 AS trace_flags, NULL AS trace_state,
  'j' || i::text AS junjo_id, 'p' AS junjo_parent_id,
  CASE WHEN i = 0 THEN 'workflow' ELSE 'node' END AS junjo_span_type,
  '{{}}'{json} AS junjo_wf_state_start, '{{}}'{json} AS junjo_wf_state_end,
  '{{}}'{json} AS junjo_wf_graph_structure, '' AS junjo_wf_store_id
FROM {source}
"""


def _duckdb_rows(traces: int) -> str:
    return _ROWS_SQL.format(
        hex32="printf('%032x', t)",
        hex16_span=f"printf('%016x', t * {TRACE_SPANS} + i)",
        hex16_root=f"printf('%016x', t * {TRACE_SPANS})",
        services=SERVICES,
        start=f"make_timestamptz({_BASE_US} + t * 1000000 + i * 1000)",
        end=f"make_timestamptz({_BASE_US} + t * 1000000 + i * 1000 + 500)",
        json="::JSON",
        source=f"range({traces}) AS a(t), range({TRACE_SPANS}) AS b(i)",
    )


def _postgres_rows(traces: int) -> str:
    return _ROWS_SQL.format(
        hex32="lpad(to_hex(t), 32, '0')",
        hex16_span=f"lpad(to_hex(t * {TRACE_SPANS} + i), 16, '0')",
        hex16_root=f"lpad(to_hex(t * {TRACE_SPANS}), 16, '0')",
        services=SERVICES,
        start=f"to_timestamp(({_BASE_US} + t * 1000000 + i * 1000) / 1e6)",
        end=f"to_timestamp(({_BASE_US} + t * 1000000 + i * 1000 + 500) / 1e6)",
        json="::json",
        source=(
            f"generate_series(0::bigint, {traces - 1}) AS t, "
            f"generate_series(0::bigint, {TRACE_SPANS - 1}) AS i"
        ),
    )


def fill_duckdb(path: Path, traces: int) -> None:
    """A new DuckDB file in the Go schema, holding traces x 200 spans."""
    with contextlib.closing(
        duckdb.connect(str(path), config={"storage_compatibility_version": "v1.0.0"})
    ) as conn:
        for statements in schema.DUCKDB_TABLES.values():
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"INSERT INTO spans {_duckdb_rows(traces)}")


async def fill_postgres(url: str, traces: int) -> None:
    """The PostgreSQL store's tables (schema.POSTGRES_DDL), holding traces x 200 spans."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in schema.POSTGRES_DDL:
                await conn.exec_driver_sql(statement)
            await conn.exec_driver_sql(f"INSERT INTO spans {_postgres_rows(traces)}")
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE spans")
    finally:
        await close_engine(engine)


def serve(kind: str, where: str, port: int) -> None:
    """The server process: the routes over one store, on 127.0.0.1:port, until killed."""
    import uvicorn  # noqa: PLC0415
    from fastapi import FastAPI  # noqa: PLC0415

    from junjo_backend.settings import Settings  # noqa: PLC0415
    from junjo_backend.span_api import install_span_api  # noqa: PLC0415
    from junjo_backend.store.api import DuckDBReader, PostgresReader, SpanReader  # noqa: PLC0415
    from junjo_backend.store.duckdb_store import DuckDBStore  # noqa: PLC0415

    async def run() -> None:
        reader: SpanReader
        if kind == "duckdb":
            store = DuckDBStore(Path(where), converter="thread")
            await store.open()
            reader = DuckDBReader(store.cursor)
        else:
            reader = PostgresReader(create_engine(where))
        app = FastAPI()
        install_span_api(app, Settings(_env_file=None), lambda _request: reader)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(run())


@contextlib.contextmanager
def server(kind: str, where: str) -> Iterator[str]:
    """The server process's base URL while it runs."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, where, str(port)], env=dict(os.environ)
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base}/otel/span-service-names", timeout=5).status_code == 200
            return False

        wait_until_sync(up, f"{kind} span API server", limit=120, every=0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(base: str, traces: int, requests: int) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) of each route, one request at a time, after a short warm-up."""
    routes: dict[str, Callable[[int], str]] = {
        "nested-spans": lambda n: f"/otel/trace/{(n * 7919) % traces:032x}/nested-spans",
        "root-spans": lambda n: f"/otel/service/svc-{n % SERVICES}/root-spans",
    }
    figures = {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for name, route in routes.items():
            for n in range(10):
                client.get(route(n))
            timings, rows = [], 0
            for n in range(requests):
                started = time.perf_counter()
                response = client.get(route(n))
                timings.append((time.perf_counter() - started) * 1000)
                rows = len(response.json())
            figures[name] = {
                "p50_ms": round(_percentile(timings, 0.5), 2),
                "p99_ms": round(_percentile(timings, 0.99), 2),
                "rows": rows,
            }
    return figures


def run(spans: int, requests: int) -> dict[str, object]:
    """Fill both stores, serve each, measure; the figures with their bars."""
    from tests.postgres_cluster import throwaway_cluster  # noqa: PLC0415 (pytest-free use)

    traces = spans // TRACE_SPANS
    results: dict[str, object] = {"spans": traces * TRACE_SPANS, "bar_p99_ms": BAR_MS}
    with tempfile.TemporaryDirectory(prefix="junjo-span-api-bench-") as folder:
        path = Path(folder) / "otel_data.db"
        started = time.perf_counter()
        fill_duckdb(path, traces)
        print(f"duckdb: {traces * TRACE_SPANS} spans in {time.perf_counter() - started:.0f} s")
        with server("duckdb", str(path)) as base:
            results["duckdb"] = measure(base, traces, requests)
        print(f"duckdb: {results['duckdb']}")
    with throwaway_cluster("junjo-span-api-bench-pg-") as cluster:
        url = asyncio.run(cluster.new_database())
        started = time.perf_counter()
        asyncio.run(fill_postgres(url, traces))
        print(f"postgresql: {traces * TRACE_SPANS} spans in {time.perf_counter() - started:.0f} s")
        with server("postgresql", url) as base:
            results["postgresql"] = measure(base, traces, requests)
        print(f"postgresql: {results['postgresql']}")
    return results


def main() -> int:
    """Parse the options, run, print and write bench-results/span_api.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--serve", nargs=3, metavar=("KIND", "WHERE", "PORT"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args()
    if arguments.serve:
        kind, where, port = arguments.serve
        serve(kind, where, int(port))
        return 0
    results = run(arguments.spans, arguments.requests)
    failed = [
        f"{store} {route} p99 {figures['p99_ms']} ms > {BAR_MS} ms"
        for store in ("duckdb", "postgresql")
        for route, figures in results[store].items()  # type: ignore[attr-defined]
        if figures["p99_ms"] > BAR_MS
    ]
    results["bar_met"] = not failed
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for line in failed:
        print(f"BAR MISSED: {line}")
    print("bars met" if not failed else "bars missed", f"(written to {RESULTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
