"""Conversion in worker processes: the poller's batches converted on every core, GIL-free.

Conversion is pure Python and holds the GIL: in a thread of the backend it would slow
`ValidateApiKey` while the store writes, and it would use one core. Worker processes
(`python -m junjo_backend.store.worker`, which imports the conversion and pyarrow, not the
backend) convert slices of a large batch to Arrow tables; the slices are put back together
in order here, keeping the first of each span id across them. A slice's tables unpickle as
buffers, so taking one in costs the backend microseconds, not a Python object a value.
Small batches are converted in a thread: shipping them costs more than it saves. See
`docs/design/span-store.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sys
from typing import TYPE_CHECKING, Final

import pyarrow as pa
import pyarrow.compute as pc

from junjo_backend.store.convert import ConvertedBatch, convert_batch
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


def merge(parts: Sequence[ConvertedBatch]) -> ConvertedBatch:
    """Converted slices of one batch, in order, as one: the first of each span id is kept."""
    spans = [part.spans for part in parts]
    patches = [part.patches for part in parts]
    if len(parts) > 1 and _repeats_a_span(parts):
        spans, patches = _first_of_each_span(parts)
    return ConvertedBatch(
        spans=pa.concat_tables(spans),
        patches=pa.concat_tables(patches),
        set_aside=[row for part in parts for row in part.set_aside],
        last_key=parts[-1].last_key,
        records=sum(part.records for part in parts),
    )


def _span_ids(table: pa.Table) -> list[pa.Array]:
    """Each row's `trace_id/span_id` as one string (both are hex: "/" cannot occur), chunked."""
    joined = pc.binary_join_element_wise(table["trace_id"], table["span_id"], "/")
    return list(joined.chunks)


def _repeats_a_span(parts: Sequence[ConvertedBatch]) -> bool:
    """Whether a span id stands in more than one slice (each slice holds it once at most)."""
    ids = pa.chunked_array([c for part in parts for c in _span_ids(part.spans)], type=pa.string())
    return int(pc.count_distinct(ids).as_py()) < len(ids)


def _first_of_each_span(parts: Sequence[ConvertedBatch]) -> tuple[list[pa.Table], list[pa.Table]]:
    """Each slice's spans and patches without those of a span an earlier slice holds."""
    seen: list[pa.Array] = []
    spans: list[pa.Table] = []
    patches: list[pa.Table] = []
    for part in parts:
        earlier = pa.concat_arrays(seen) if seen else pa.array([], type=pa.string())
        ids = pa.chunked_array(_span_ids(part.spans), type=pa.string())
        patch_ids = pa.chunked_array(_span_ids(part.patches), type=pa.string())
        spans.append(part.spans.filter(pc.invert(pc.is_in(ids, value_set=earlier))))
        patches.append(part.patches.filter(pc.invert(pc.is_in(patch_ids, value_set=earlier))))
        seen.extend(ids.chunks)
    return spans, patches


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

    async def convert(self, fields: list[tuple[bytes, bytes, bytes]]) -> ConvertedBatch:
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
        if not isinstance(result, ConvertedBatch):  # pragma: no cover (the worker's contract)
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


class AheadConverter:
    """A converter that can start on the batch expected next while the current one is stored.

    `prepare(batch)` names the batch the poller will most likely write next. It is converted
    once the current conversion is done (so the two do not share the workers), while the
    current batch is inserted; when it comes, its conversion is taken as it is. A batch that
    does not match (a retry after a failure, a redelivery) is converted anew, and the
    prepared one is dropped. Conversion has no side effect: nothing of a prepared batch is
    stored until it is written.
    """

    def __init__(self, convert: Converter) -> None:
        self._convert = convert
        self._next: Sequence[SpanRecord] | None = None
        self._ahead: tuple[_BatchId, asyncio.Task[ConvertedBatch]] | None = None

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """Remember `batch`: it is converted after the next conversion this one makes."""
        self._next = batch or None

    async def __call__(self, records: Sequence[SpanRecord]) -> ConvertedBatch:
        """`records` converted: the prepared conversion when it is theirs, else a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == _batch_id(records):
            converted = await ahead[1]
        else:
            if ahead is not None:
                _drop(ahead[1])
            converted = await self._convert(records)
        upcoming, self._next = self._next, None
        if upcoming is not None and _batch_id(upcoming) != _batch_id(records):
            task = asyncio.create_task(_converting(self._convert, upcoming), name="convert-ahead")
            self._ahead = (_batch_id(upcoming), task)
        return converted

    async def close(self) -> None:
        """Let a conversion under way finish (before the workers stop); its result is dropped."""
        ahead, self._ahead, self._next = self._ahead, None, None
        if ahead is not None:
            with contextlib.suppress(Exception):
                await ahead[1]


# A batch, as far as matching a prepared conversion goes: WAL keys are unique.
_BatchId = tuple[bytes, bytes, int]


def _batch_id(records: Sequence[SpanRecord]) -> _BatchId:
    return (records[0].key, records[-1].key, len(records)) if records else (b"", b"", 0)


async def _converting(convert: Converter, records: Sequence[SpanRecord]) -> ConvertedBatch:
    return await convert(records)


def _drop(task: asyncio.Task[ConvertedBatch]) -> None:
    """A prepared conversion nobody will take: let it finish (it holds workers), unheard."""

    def quiet(done: asyncio.Task[ConvertedBatch]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved, so that asyncio does not report it

    task.add_done_callback(quiet)


async def convert_in_thread(records: Sequence[SpanRecord]) -> ConvertedBatch:
    """Convert off the event loop, in a thread of this process (holds the GIL meanwhile)."""
    return await asyncio.to_thread(convert_batch, records)
