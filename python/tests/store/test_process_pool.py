"""Conversion in worker processes gives the rows one `convert_batch` gives."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from junjo_backend.store.convert import convert_batch
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store.priority import STORE_NICENESS
from junjo_backend.store.process_pool import (
    AheadConverter,
    ConversionError,
    ProcessConverter,
    convert_in_thread,
    merge,
)
from tests.store.golden import batches
from tests.store.records import record, set_state

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.store.convert import ConvertedBatch

EVERY_GOLDEN_RECORD = [r for batch in batches() for r in batch]


def test_merged_slices_keep_the_first_of_each_span_across_slices() -> None:
    first = [record(1, events=[set_state("{}")]), record(2)]
    # The next slice repeats span 1 (with another patch) and adds span 3.
    second = [record(3, span_n=1, events=[set_state("{}"), set_state("[]")]), record(4)]
    merged = merge([convert_batch(first), convert_batch(second)])
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


async def test_workers_load_pyarrow_but_not_the_backend() -> None:
    converter = ProcessConverter(workers=1, min_records=1)
    try:
        await converter.start()
        # (A text Python's JSON parser rejects would make the worker ask DuckDB: none here.)
        await converter([record(n, events=[set_state('{"a":1}')]) for n in range(50)])
        (pid,) = converter.worker_pids()
        maps = await asyncio.to_thread(worker_modules, pid)
    finally:
        await converter.close()
    assert "pyarrow" in maps  # the slices come back as Arrow tables
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


class CountingConverter:
    """The thread converter, counting which batches it was asked for (by their first key)."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    async def __call__(self, records: Sequence[SpanRecord]) -> ConvertedBatch:
        self.asked.append(records[0].key)
        return await convert_in_thread(records)


async def test_a_prepared_batch_is_converted_once_after_the_one_before() -> None:
    counting = CountingConverter()
    ahead = AheadConverter(counting)
    first = [record(n, events=[set_state("{}")]) for n in range(10)]
    second = [record(n, events=[set_state("[]")]) for n in range(10, 20)]
    ahead.prepare(second)
    assert counting.asked == []  # not before the current batch is converted
    converted = await ahead(first)
    assert converted.spans.equals(convert_batch(first).spans)
    converted = await ahead(second)
    assert counting.asked == [first[0].key, second[0].key]
    whole = convert_batch(second)
    assert converted.spans.equals(whole.spans)
    assert converted.patches.equals(whole.patches)
    await ahead.close()


async def test_a_batch_other_than_the_prepared_one_is_converted_anew() -> None:
    counting = CountingConverter()
    ahead = AheadConverter(counting)
    first = [record(n) for n in range(10)]
    prepared = [record(n) for n in range(10, 20)]
    retried = prepared[:5]  # a retry after a failure may cut the batch elsewhere
    ahead.prepare(prepared)
    await ahead(first)
    converted = await ahead(retried)
    assert converted.spans.equals(convert_batch(retried).spans)
    assert counting.asked == [first[0].key, prepared[0].key, retried[0].key]
    await ahead.close()


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _below_auth() -> int:
    """What the store's work runs at, this process's niceness being the auth path's."""
    return min(19, _own_niceness() + STORE_NICENESS)


async def test_the_stores_workers_and_its_thread_run_below_auth(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db")
    await store.open()
    try:
        async with engine.begin() as conn:
            await store.write([record(n) for n in range(300)], conn)
        assert store.worker_pids()
        for pid in store.worker_pids():
            assert os.getpriority(os.PRIO_PROCESS, pid) == _below_auth()
        # The thread the store's statements run on (and only that one: not this thread).
        assert await store._in_thread(_own_niceness) == _below_auth()
    finally:
        await store.close()
