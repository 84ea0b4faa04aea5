"""PostgreSQL span store write speed, and its ratio to the DuckDB store, on SDK-shaped spans.

    uv run --no-sync python benchmarks/store_postgres_bench.py [--spans 200000] [--batch 10000]

Each batch goes through `PostgresStore.write` and the checkpoint in one transaction (the
poller's commit), into a throwaway PostgreSQL cluster on this machine; the same batches go
through `DuckDBStore.write` (its own commit, then the checkpoint in SQLite). Both use the
process-pool converter. Also prints the conversion alone (one process) to show what limits
each. Aim (issue 19): >= 10,000 spans/s on PostgreSQL. Results also go to
bench-results/store_postgres.json. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from junjo_spans import junjo_records

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.poller.checkpoint import save_checkpoint
from junjo_backend.store.convert import convert_batch
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store.postgres_store import PostgresStore

if TYPE_CHECKING:
    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.store.base import SpanStore

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench-results" / "store_postgres.json"
AIM = 10_000


def _batches(spans: int, batch: int) -> list[list[SpanRecord]]:
    records = junjo_records(spans)
    return [chunk for _ in range(spans) if (chunk := list(itertools.islice(records, batch)))]


async def _write(
    database_url: str, store_of: type, where: object, batches: list[list[SpanRecord]]
) -> float:
    engine = create_engine(database_url)
    await init_schema(engine)
    store: SpanStore = store_of(where if where is not None else engine)
    await store.open()
    try:
        started = time.perf_counter()
        for batch in batches:
            async with engine.begin() as conn:
                await store.write(batch, conn)
                await save_checkpoint(conn, batch[-1].key)
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
        await close_engine(engine)
    return sum(map(len, batches)) / elapsed


def _convert_only(batches: list[list[SpanRecord]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        convert_batch(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


def run(spans: int, batch: int) -> dict[str, object]:
    """Both stores over the same batches; spans/s and the ratio."""
    from tests.postgres_cluster import throwaway_cluster  # noqa: PLC0415

    batches = _batches(spans, batch)
    convert = _convert_only(batches[: max(1, len(batches) // 4)])
    with tempfile.TemporaryDirectory(prefix="junjo-store-pg-bench-") as folder:
        sqlite = f"sqlite+aiosqlite:///{Path(folder) / 'junjo.db'}"
        duck = asyncio.run(_write(sqlite, DuckDBStore, Path(folder) / "otel_data.db", batches))
    with throwaway_cluster("junjo-store-pg-bench-") as cluster:
        url = asyncio.run(cluster.new_database())
        postgres = asyncio.run(_write(url, PostgresStore, None, batches))
    return {
        "spans": spans,
        "batch": batch,
        "convert_only_one_process_spans_per_s": round(convert),
        "duckdb_spans_per_s": round(duck),
        "postgresql_spans_per_s": round(postgres),
        "postgresql_to_duckdb": round(postgres / duck, 2),
        "aim_spans_per_s": AIM,
        "aim_met": postgres >= AIM,
    }


def main() -> int:
    """Parse the options, run, print and write bench-results/store_postgres.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000)
    arguments = parser.parse_args()
    results = run(arguments.spans, arguments.batch)
    for name, value in results.items():
        print(f"{name}: {value}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
