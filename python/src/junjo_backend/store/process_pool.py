"""Conversion in worker processes: the poller's batches converted on every core, GIL-free.

Conversion is pure Python and holds the GIL: in a thread of the backend it would slow
`ValidateApiKey` while the store writes, and it would use one core. Worker processes
(spawned, so they inherit no gRPC or DuckDB state) each convert a slice of a large batch;
the slices are put back together in order, keeping the first of each span id across
them. Small batches are converted in a thread: shipping them costs more than it saves.
See `docs/design/span-store.md`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Final

import pyarrow as pa
import pyarrow.compute as pc

from junjo_backend.ingestion.spans import SpanRecord
from junjo_backend.store.convert import ConvertedBatch, convert_batch

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_WORKERS: Final = 2
# Below this many records a batch is converted in a thread of this process.
DEFAULT_MIN_RECORDS: Final = 2_000


def _ids(table: pa.Table) -> pa.Array:
    """Each row's "trace_id/span_id" (neither holds a "/": they are hex)."""
    joined = pc.binary_join_element_wise(table["trace_id"], table["span_id"], "/")
    return joined.combine_chunks()


def _without(table: pa.Table, ids: pa.Array, seen: pa.Array) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(ids, value_set=seen)))


def merge(parts: Sequence[ConvertedBatch]) -> ConvertedBatch:
    """Converted slices of one batch, in order, as one: the first of each span id is kept."""
    spans = [parts[0].spans]
    patches = [parts[0].patches]
    seen = _ids(parts[0].spans)
    for part in parts[1:]:
        part_spans, part_patches = part.spans, part.patches
        span_ids = _ids(part_spans)
        if pc.any(pc.is_in(span_ids, value_set=seen)).as_py():
            part_spans = _without(part_spans, span_ids, seen)
            part_patches = _without(part_patches, _ids(part_patches), seen)
            span_ids = _ids(part_spans)
        spans.append(part_spans)
        patches.append(part_patches)
        seen = pa.concat_arrays([seen, span_ids])
    return ConvertedBatch(
        spans=pa.concat_tables(spans),
        patches=pa.concat_tables(patches),
        set_aside=[row for part in parts for row in part.set_aside],
        last_key=parts[-1].last_key,
        records=sum(part.records for part in parts),
    )


def _convert_fields(fields: list[tuple[bytes, bytes, bytes]]) -> ConvertedBatch:
    """In a worker: `convert_batch` of the records with these (key, span, resource) bytes."""
    return convert_batch([SpanRecord(*row) for row in fields])


class ProcessConverter:
    """A converter (`DuckDBStore(converter=...)`) over a pool of spawned worker processes.

    The pool starts at `start` (or the first large batch) and stops at `close`.
    """

    def __init__(
        self, *, workers: int = DEFAULT_WORKERS, min_records: int = DEFAULT_MIN_RECORDS
    ) -> None:
        self._workers = workers
        self._min_records = min_records
        self._pool: ProcessPoolExecutor | None = None

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    async def start(self) -> None:
        """Start the workers and let each import the conversion (spawning takes seconds)."""
        pool = self._started()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(pool, _convert_fields, []) for _ in range(self._workers))
        )

    async def __call__(self, records: Sequence[SpanRecord]) -> ConvertedBatch:
        """`convert_batch(records)`, in the workers when the batch is large."""
        if len(records) < self._min_records:
            return await asyncio.to_thread(convert_batch, records)
        self._started()
        loop = asyncio.get_running_loop()
        size = -(-len(records) // self._workers)
        # Plain tuples: a pickled dataclass costs the event loop's thread four times as much.
        fields = [(r.key, r.span_bytes, r.resource_bytes) for r in records]
        slices = [fields[start : start + size] for start in range(0, len(fields), size)]
        pool = self._pool
        parts = await asyncio.gather(
            *(loop.run_in_executor(pool, _convert_fields, part) for part in slices)
        )
        return merge(parts)

    def worker_pids(self) -> list[int]:
        """The workers' process ids (for RSS accounting); empty before the first large batch."""
        if self._pool is None:
            return []
        return sorted(self._pool._processes)  # noqa: SLF001 (no public accessor)

    async def close(self) -> None:
        """Stop the workers (waiting for any conversion in progress)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)
