"""Store micro-benchmark: conversion alone, and conversion + DuckDB insert, on SDK-shaped spans.

    uv run --no-sync python benchmarks/store_convert_bench.py [--spans 100000] [--batch 10000]

Prints spans/s for `convert_batch` alone (this process), and for `DuckDBStore.write`
end to end into a new file (convert + insert + commit), with the thread converter and
with the process-pool converter. Stops by itself; figures are information, not bars.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from junjo_spans import junjo_records

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.store.convert import convert_batch
from junjo_backend.store.duckdb_store import DuckDBStore

if TYPE_CHECKING:
    from junjo_backend.ingestion.spans import SpanRecord


def _batches(spans: int, batch: int) -> list[list[SpanRecord]]:
    records = list(junjo_records(spans))
    return [records[i : i + batch] for i in range(0, len(records), batch)]


def convert_only(batches: list[list[SpanRecord]]) -> float:
    """Spans/s of convert_batch over every batch, in this process."""
    started = time.perf_counter()
    total: int = sum(convert_batch(batch).spans.num_rows for batch in batches)
    return total / (time.perf_counter() - started)


async def store_write(
    batches: list[list[SpanRecord]], workdir: Path, converter: Literal["thread", "process"]
) -> float:
    """Spans/s of DuckDBStore.write over every batch into a new file."""
    engine = create_engine(f"sqlite+aiosqlite:///{workdir / f'{converter}.db'}")
    await init_schema(engine)
    store = DuckDBStore(workdir / f"{converter}-otel.db", converter=converter)
    await store.open()
    try:
        started = time.perf_counter()
        for batch in batches:
            async with engine.begin() as conn:
                await store.write(batch, conn)
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
        await close_engine(engine, quiet=True)
    return sum(len(b) for b in batches) / elapsed


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    args = parser.parse_args()
    batches = _batches(args.spans, args.batch)
    size = sum(len(r.span_bytes) for b in batches for r in b) / args.spans
    print(f"{args.spans} spans, {size:.0f} B each on average, batches of {args.batch}")
    print(f"convert_batch alone:         {convert_only(batches):9.0f} spans/s")
    with tempfile.TemporaryDirectory() as workdir:
        converters: tuple[Literal["thread", "process"], ...] = ("thread", "process")
        for converter in converters:
            rate = asyncio.run(store_write(batches, Path(workdir), converter))
            print(f"DuckDBStore.write ({converter:7}): {rate:9.0f} spans/s")


if __name__ == "__main__":
    main()
