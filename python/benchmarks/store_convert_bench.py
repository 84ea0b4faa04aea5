"""Store micro-benchmark: conversion alone, and conversion + DuckDB insert, on SDK-shaped spans.

    uv run --no-sync python benchmarks/store_convert_bench.py [--spans 100000] [--batch 10000]

Prints spans/s for `convert_batch` alone (this process), and for `DuckDBStore.write`
end to end into a new file (convert + insert + commit), with the thread converter and
with the process-pool converter, with the peak RSS of this process plus the conversion
workers. The spans are made batch by batch, untimed. Stops by itself; figures are
information, not bars.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
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
    from collections.abc import Iterator

    from junjo_backend.ingestion.spans import SpanRecord


def _batches(spans: int, batch: int) -> Iterator[list[SpanRecord]]:
    """The records batch by batch, made as they are needed (memory stays flat)."""
    records = junjo_records(spans)
    while chunk := list(itertools.islice(records, batch)):
        yield chunk


def convert_only(spans: int, batch: int) -> float:
    """Spans/s of convert_batch over every batch, in this process (making them not timed)."""
    elapsed = cpu = 0.0
    for chunk in _batches(spans, batch):
        started, cpu_started = time.perf_counter(), time.process_time()
        convert_batch(chunk)
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    print(f"  CPU per span: {cpu / spans * 1e6:.0f} µs")
    return spans / elapsed


def rss_mb(pid: int) -> float:
    """A process's resident set size (0 once it is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text(encoding="ascii").split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample(store: DuckDBStore, peak: list[float], workers_cpu: dict[int, float]) -> None:
    """Keep the peak of this process's RSS plus the workers', and each worker's CPU time."""
    while True:
        pids = store.worker_pids()
        peak[0] = max(peak[0], rss_mb(os.getpid()) + sum(rss_mb(pid) for pid in pids))
        workers_cpu.update({pid: cpu_seconds(pid) for pid in pids})
        await asyncio.sleep(0.2)


async def store_write(
    spans: int, batch: int, workdir: Path, converter: Literal["thread", "process"]
) -> tuple[float, float]:
    """Spans/s of DuckDBStore.write over every batch into a new file, and the peak RSS."""
    engine = create_engine(f"sqlite+aiosqlite:///{workdir / f'{converter}.db'}")
    await init_schema(engine)
    store = DuckDBStore(workdir / f"{converter}-otel.db", converter=converter)
    await store.open()
    peak = [0.0]
    workers_cpu: dict[int, float] = {}
    sampler = asyncio.create_task(sample(store, peak, workers_cpu))
    try:
        workers_before = {pid: cpu_seconds(pid) for pid in store.worker_pids()}
        elapsed = cpu = 0.0
        for chunk in _batches(spans, batch):
            started, cpu_started = time.perf_counter(), time.process_time()
            async with engine.begin() as conn:
                await store.write(chunk, conn)
            elapsed += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
        workers_cpu.update({pid: cpu_seconds(pid) for pid in store.worker_pids()})
    finally:
        sampler.cancel()
        await store.close()
        await close_engine(engine, quiet=True)
    worker_seconds = sum(workers_cpu.values()) - sum(workers_before.values())
    print(
        f"  CPU per span: this process {cpu / spans * 1e6:.0f} µs,"
        f" workers {worker_seconds / spans * 1e6:.0f} µs"
    )
    return spans / elapsed, peak[0]


def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--converter", choices=["thread", "process", "both"], default="both")
    args = parser.parse_args()
    sample = list(junjo_records(1000))
    size = sum(len(r.span_bytes) for r in sample) / len(sample)
    print(f"{args.spans} spans, {size:.0f} B each on average, batches of {args.batch}")
    print(f"convert_batch alone:         {convert_only(args.spans, args.batch):9.0f} spans/s")
    with tempfile.TemporaryDirectory() as workdir:
        converters: tuple[Literal["thread", "process"], ...] = (
            ("thread", "process") if args.converter == "both" else (args.converter,)
        )
        for converter in converters:
            rate, peak = asyncio.run(store_write(args.spans, args.batch, Path(workdir), converter))
            print(f"DuckDBStore.write ({converter:7}): {rate:9.0f} spans/s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
