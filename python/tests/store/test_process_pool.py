"""Conversion in worker processes gives the rows one `convert_batch` gives."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from junjo_backend.store.convert import convert_batch, convert_rows
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store.process_pool import ConversionError, ProcessConverter, merge
from tests.store.golden import batches
from tests.store.records import record, set_state

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

EVERY_GOLDEN_RECORD = [r for batch in batches() for r in batch]


def test_merged_slices_keep_the_first_of_each_span_across_slices() -> None:
    first = [record(1, events=[set_state("{}")]), record(2)]
    # The next slice repeats span 1 (with another patch) and adds span 3.
    second = [record(3, span_n=1, events=[set_state("{}"), set_state("[]")]), record(4)]
    merged = merge([convert_rows(first), convert_rows(second)])
    whole = convert_batch(first + second)
    assert merged.spans.equals(whole.spans)
    assert merged.patches.equals(whole.patches)
    assert merged.patches.num_rows == 1
    assert (merged.last_key, merged.records) == (whole.last_key, whole.records)


async def test_worker_processes_convert_as_this_process_does() -> None:
    converter = ProcessConverter(workers=2, min_records=1)
    try:
        await converter.start()
        assert len(converter.worker_pids()) == 2
        converted = await converter(EVERY_GOLDEN_RECORD)
    finally:
        await converter.close()
    assert converter.worker_pids() == []
    whole = convert_batch(EVERY_GOLDEN_RECORD)
    assert converted.spans.equals(whole.spans)
    assert converted.patches.equals(whole.patches)
    assert converted.set_aside == whole.set_aside


async def test_a_store_with_worker_processes(tmp_path: Path, engine: AsyncEngine) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db")
    await store.open()
    try:
        assert len(store.worker_pids()) == 2
        batch = [record(n, events=[set_state("{}")]) for n in range(3000)]
        async with engine.begin() as conn:
            written = await store.write(batch, conn)
        assert (written.stored, written.patches) == (3000, 3000)
    finally:
        await store.close()
    assert store.worker_pids() == []


def worker_modules(pid: int) -> str:
    """The shared objects a process has mapped (pyarrow's show whether it loaded pyarrow)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_workers_load_neither_pyarrow_nor_the_backend() -> None:
    converter = ProcessConverter(workers=1, min_records=1)
    try:
        await converter.start()
        # (A text Python's JSON parser rejects would make the worker ask DuckDB: none here.)
        await converter([record(n, events=[set_state('{"a":1}')]) for n in range(50)])
        (pid,) = converter.worker_pids()
        maps = await asyncio.to_thread(worker_modules, pid)
    finally:
        await converter.close()
    assert "pyarrow" not in maps
    assert "_duckdb" not in maps
    assert "grpc" not in maps


async def test_a_dead_worker_fails_the_batch_and_is_replaced() -> None:
    converter = ProcessConverter(workers=1, min_records=1)
    try:
        await converter.start()
        (pid,) = converter.worker_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConversionError, match=f"conversion worker {pid} died"):
            await converter(EVERY_GOLDEN_RECORD)
        converted = await converter(EVERY_GOLDEN_RECORD)
        assert converted.spans.num_rows == convert_batch(EVERY_GOLDEN_RECORD).spans.num_rows
        assert converter.worker_pids() != [pid]
    finally:
        await converter.close()


async def test_a_store_whose_workers_cannot_start_converts_in_a_thread(
    tmp_path: Path, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker process that cannot be started (the interpreter gone, say): only a bad
    # executable path makes that happen here.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    store = DuckDBStore(tmp_path / "otel_data.db")
    await store.open()
    try:
        assert store.worker_pids() == []
        batch = [record(n) for n in range(600)]
        async with engine.begin() as conn:
            assert (await store.write(batch, conn)).stored == 600
    finally:
        await store.close()
