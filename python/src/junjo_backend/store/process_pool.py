"""Conversion in worker processes: the poller's batches converted on every core, GIL-free.

Conversion is pure Python and holds the GIL: in a thread of the backend it would slow
`ValidateApiKey` while the store writes, and it would use one core. Worker processes
(`python -m junjo_backend.store.worker`, which imports the conversion alone: not the
backend, not pyarrow) convert slices of a large batch to row tuples; the slices are put
back together in order, keeping the first of each span id across them, and made Arrow
here. Slices are small, so that unpickling one holds the GIL for milliseconds only. Small
batches are converted in a thread: shipping them costs more than it saves. See
`docs/design/span-store.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sys
from typing import TYPE_CHECKING, Final

from junjo_backend.store.convert import ConvertedBatch, ConvertedRows, convert_batch, to_arrow
from junjo_backend.store.worker import HEADER_BYTES, WorkerFailure

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from junjo_backend.ingestion.spans import SpanRecord

    # What a store converts a batch with: a ProcessConverter, or convert_in_thread.
    Converter = Callable[[Sequence[SpanRecord]], Awaitable[ConvertedBatch]]

DEFAULT_WORKERS: Final = 2
# Below this many records a batch is converted in a thread of this process (a worker's
# round trip costs about a millisecond; converting 256 spans here holds the GIL ~15 ms).
DEFAULT_MIN_RECORDS: Final = 256
SLICE_RECORDS: Final = 1_000
_STOP_SECONDS: Final = 10.0


class ConversionError(RuntimeError):
    """A worker failed or died; the write fails and the batch is retried."""


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


class _Worker:
    """One worker process and its pipes; one task at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._lock = asyncio.Lock()
        self._broken = False

    @classmethod
    async def start(cls) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "junjo_backend.store.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    @property
    def alive(self) -> bool:
        return not self._broken and self.process.returncode is None

    def _break(self) -> None:
        """Out of use from now on (its pipes may be out of step), and killed."""
        self._broken = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def convert(self, fields: list[tuple[bytes, bytes, bytes]]) -> ConvertedRows:
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None:  # pragma: no cover (both are pipes)
            raise ConversionError("the conversion worker has no pipes")
        payload = pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._lock:
            try:
                stdin.write(len(payload).to_bytes(HEADER_BYTES, "big") + payload)
                await stdin.drain()
                size = int.from_bytes(await stdout.readexactly(HEADER_BYTES), "big")
                frame = await stdout.readexactly(size)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self._break()
                raise ConversionError(f"conversion worker {self.process.pid} died") from error
            except asyncio.CancelledError:  # a frame half read or written
                self._break()
                raise
        result = pickle.loads(frame)  # noqa: S301 (our own child, over its pipe)
        if isinstance(result, WorkerFailure):
            raise ConversionError(f"conversion worker failed: {result.message}")
        if not isinstance(result, ConvertedRows):  # pragma: no cover (the worker's contract)
            raise ConversionError("conversion worker sent something else")
        return result

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), _STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class ProcessConverter:
    """A converter (`DuckDBStore(converter=...)`) over worker processes of its own.

    The workers start at `start` (or the first large batch), a dead one is replaced at the
    next batch, and all stop at `close`.
    """

    def __init__(
        self, *, workers: int = DEFAULT_WORKERS, min_records: int = DEFAULT_MIN_RECORDS
    ) -> None:
        self._size = workers
        self._min_records = min_records
        self._workers: list[_Worker] = []

    async def start(self) -> None:
        """Start the missing workers (each imports the conversion: a second or two)."""
        alive = [worker for worker in self._workers if worker.alive]
        started = await asyncio.gather(*(_Worker.start() for _ in range(self._size - len(alive))))
        self._workers = [*alive, *started]
        await asyncio.gather(*(worker.convert([]) for worker in started))  # imported, ready

    async def __call__(self, records: Sequence[SpanRecord]) -> ConvertedBatch:
        """`convert_batch(records)`, in the workers when the batch is large."""
        if len(records) < self._min_records:
            return await asyncio.to_thread(convert_batch, records)
        await self.start()
        # Plain tuples: a pickled dataclass costs this thread four times as much.
        fields = [(r.key, r.span_bytes, r.resource_bytes) for r in records]
        slices = [fields[i : i + SLICE_RECORDS] for i in range(0, len(fields), SLICE_RECORDS)]
        workers = self._workers
        parts = await asyncio.gather(
            *(workers[n % len(workers)].convert(part) for n, part in enumerate(slices))
        )
        return await asyncio.to_thread(merge, parts)

    def worker_pids(self) -> list[int]:
        """The live workers' process ids (for RSS accounting)."""
        return sorted(worker.process.pid for worker in self._workers if worker.alive)

    async def close(self) -> None:
        """Stop the workers (after any conversion in progress)."""
        workers, self._workers = self._workers, []
        await asyncio.gather(*(worker.stop() for worker in workers))


async def convert_in_thread(records: Sequence[SpanRecord]) -> ConvertedBatch:
    """Convert off the event loop, in a thread of this process (holds the GIL meanwhile)."""
    return await asyncio.to_thread(convert_batch, records)
