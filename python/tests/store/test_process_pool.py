"""Conversion in worker processes gives the rows one `convert_batch` gives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from junjo_backend.store.convert import convert_batch, convert_rows
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store.process_pool import ProcessConverter, merge
from tests.store.golden import batches
from tests.store.records import record, set_state

if TYPE_CHECKING:
    from pathlib import Path

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
        # A worker never loads pyarrow (55 MB of RSS each): it sends back plain tuples.
        assert converter._pool is not None
        loaded = converter._pool.submit(eval, "'pyarrow' in __import__('sys').modules")
        assert loaded.result(timeout=60) is False
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
