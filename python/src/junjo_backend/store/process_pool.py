"""Conversion in worker processes: the poller's batches converted on every core, GIL-free.

Conversion is pure Python and holds the GIL: in a thread of the backend it would slow
`ValidateApiKey` while the store writes, and it would use one core. Worker processes
(spawned, so they inherit no gRPC or DuckDB state) each convert a slice of a large batch
to row tuples (they never load pyarrow: 55 MB a process); the slices are put back
together in order, keeping the first of each span id across them, and made Arrow here.
Small batches are converted in a thread: shipping them costs more than it saves.
See `docs/design/span-store.md`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Final

from junjo_backend.store.convert import (
    ConvertedBatch,
    ConvertedRows,
    convert_batch,
    convert_fields,
    to_arrow,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from junjo_backend.ingestion.spans import SpanRecord

DEFAULT_WORKERS: Final = 2
# Below this many records a batch is converted in a thread of this process.
DEFAULT_MIN_RECORDS: Final = 2_000


def merge(parts: Sequence[ConvertedRows]) -> ConvertedBatch:
    """Converted slices of one batch, in order, as one: the first of each span id is kept."""
    spans: list[tuple[object, ...]] = []
    patches: list[tuple[object, ...]] = []
    seen: set[tuple[object, object]] = set()
    for part in parts:
        ids = [(row[0], row[1]) for row in part.spans]
        if seen.isdisjoint(ids):
            spans.extend(part.spans)
            patches.extend(part.patches)
        else:  # a span id an earlier slice holds: that one is the first
            spans.extend(row for row, span in zip(part.spans, ids, strict=True) if span not in seen)
            patches.extend(row for row in part.patches if (row[2], row[3]) not in seen)
        seen.update(ids)
    return to_arrow(
        ConvertedRows(
            spans=spans,
            patches=patches,
            set_aside=[row for part in parts for row in part.set_aside],
            last_key=parts[-1].last_key,
            records=sum(part.records for part in parts),
        )
    )


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
            *(loop.run_in_executor(pool, convert_fields, []) for _ in range(self._workers))
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
            *(loop.run_in_executor(pool, convert_fields, part) for part in slices)
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
