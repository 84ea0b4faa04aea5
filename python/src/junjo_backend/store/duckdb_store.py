"""The DuckDB span store: the Go backend's `otel_data.db`, written exactly once per span.

One DuckDB transaction holds a batch's spans, their patches and the store's watermark (the
last WAL key it holds); the poller commits its checkpoint after it. On redelivery the
records at or below the watermark are skipped, and a span already stored adds nothing.
Only the poller's leader opens the file: DuckDB lets one process hold it. See
`docs/design/span-store.md`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import duckdb
import pyarrow as pa

from junjo_backend.settings import memory_limit_bytes
from junjo_backend.store.base import StoreStats, StoreUnavailable, StoreWrite
from junjo_backend.store.convert import (
    ConvertedBatch,
    SetAside,
    is_patch_set_aside,
)
from junjo_backend.store.priority import yield_to_auth
from junjo_backend.store.process_pool import (
    AheadConverter,
    ConversionError,
    ProcessConverter,
    convert_in_thread,
)
from junjo_backend.store.schema import (
    DUCKDB_TABLES,
    SET_ASIDE_TABLE,
    SPANS_TABLE,
    STATE_PATCHES_TABLE,
    WATERMARK_TABLE,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.store.process_pool import Converter

log = logging.getLogger(__name__)

_Result = TypeVar("_Result")

DEFAULT_MEMORY_LIMIT: Final = "256MB"
# New files in the storage format DuckDB 1.0 and 1.1 (the Go backend) read and write.
STORAGE_COMPATIBILITY_VERSION: Final = "v1.0.0"
# DuckDB checkpoints when its write-ahead log passes `checkpoint_threshold` (its default is
# 16MB). In the v1.0.0 format a checkpoint rewrites every index whole, so at 16MB (about
# one batch of 10,000 Junjo spans) each write cost more than the last: 14,000 inserted
# spans/s over 300,000 spans; at 256MB, 21,800/s over 1,000,000. But what the log holds is
# in memory too, beside the indexes: at memory_limit 256MB a 256MB threshold ran out of
# memory at a checkpoint before 200,000 spans. So the threshold is a sixteenth of the
# limit, from DuckDB's 16MB to 256MB (docs/design/span-store.md).
_CHECKPOINT_SHARE: Final = 16
_CHECKPOINT_MB: Final = (16, 256)

# "Could not set lock on file "...": Conflicting lock is held in /usr/bin/x (PID 123) ..."
_LOCK_HOLDER: Final = re.compile(
    r"Conflicting lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)"
)

_SET_ASIDE_ARROW: Final = pa.schema(
    [
        pa.field("wal_key", pa.binary(), nullable=False),
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("span_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("span_bytes", pa.binary(), nullable=False),
        pa.field("resource_bytes", pa.binary(), nullable=False),
    ]
)


# The write's statements. Only the spans actually added bring their patches: a span
# already stored (a redelivery, or a Go row) keeps the patches it has.
_INSERT_SPANS: Final = (
    f"INSERT OR IGNORE INTO {SPANS_TABLE} SELECT * FROM junjo_new_spans RETURNING trace_id, span_id"  # noqa: S608
)
_INSERT_PATCHES: Final = (
    f"INSERT OR IGNORE INTO {STATE_PATCHES_TABLE} SELECT * FROM junjo_new_patches"  # noqa: S608
)
_INSERT_SET_ASIDE: Final = (
    f"INSERT OR IGNORE INTO {SET_ASIDE_TABLE}"  # noqa: S608
    " (wal_key, trace_id, span_id, reason, span_bytes, resource_bytes)"
    " SELECT * FROM junjo_new_set_aside"
)
_SET_WATERMARK: Final = f"INSERT OR REPLACE INTO {WATERMARK_TABLE} VALUES (1, ?)"  # noqa: S608
_GET_WATERMARK: Final = f"SELECT last_key FROM {WATERMARK_TABLE} WHERE id = 1"  # noqa: S608


class StoreWriteError(RuntimeError):
    """A write did not commit (the poller retries the batch); the message is one line."""


def checkpoint_threshold(memory_limit: str) -> str:
    """DuckDB's `checkpoint_threshold` for a store with this `memory_limit` (e.g. 256MB)."""
    low, high = _CHECKPOINT_MB
    limit = memory_limit_bytes(memory_limit)
    if limit is None:  # the setting's validator lets only sizes through
        return f"{low}MB"
    megabytes = limit / _CHECKPOINT_SHARE / 1000**2
    return f"{round(min(high, max(low, megabytes)))}MB"


def open_failure(path: Path, error: duckdb.Error) -> StoreUnavailable:
    """The one-line reason an operator reads when the file cannot be opened."""
    message = str(error)
    holder = _LOCK_HOLDER.search(message)
    if holder is not None:
        program = Path(holder["program"]).name
        return StoreUnavailable(
            f"{path} is held by another process (pid {holder['pid']}, {program})"
        )
    first_line = message.splitlines()[0] if message else type(error).__name__
    return StoreUnavailable(f"{path} cannot be opened: {first_line}")


def _set_aside_table(rows: list[SetAside]) -> pa.Table:
    columns = {
        "wal_key": [row.key for row in rows],
        "trace_id": [row.trace_id for row in rows],
        "span_id": [row.span_id for row in rows],
        "reason": [row.reason for row in rows],
        "span_bytes": [row.span_bytes for row in rows],
        "resource_bytes": [row.resource_bytes for row in rows],
    }
    return pa.table(columns, schema=_SET_ASIDE_ARROW)


def _count(db: duckdb.DuckDBPyConnection, sql: str, *params: object) -> int:
    row = db.execute(sql, list(params)).fetchone()
    return int(row[0]) if row else 0


class DuckDBStore:
    """A `SpanStore` in one DuckDB file; see the module docstring.

    `converter` says where records become rows, off the event loop: "process" (worker
    processes for large batches, `process_pool.py`) or "thread" (a thread of this process).
    """

    def __init__(
        self,
        path: Path,
        *,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        converter: Literal["process", "thread"] = "process",
    ) -> None:
        self._path = path
        self._memory_limit = memory_limit
        self._pool = ProcessConverter() if converter == "process" else None
        self._convert: Converter = self._pool or convert_in_thread
        # The next batch converts while this one is inserted (process_pool.AheadConverter).
        self._ahead = AheadConverter(self._converted)
        self._db: duckdb.DuckDBPyConnection | None = None
        # Reads (the span API) get cursors of a connection of their own: never the writer's,
        # which a write is using in another thread.
        self._reader: duckdb.DuckDBPyConnection | None = None
        self._reader_lock = threading.Lock()
        self._lock = asyncio.Lock()
        # The writer's statements run on one thread of the store's own, below auth
        # (priority.py); it lives from open to close.
        self._thread: ThreadPoolExecutor | None = None
        self._watermark: bytes | None = None
        self._spans = 0
        self._set_aside = 0
        self._reopen = False

    @property
    def path(self) -> Path:
        """The DuckDB file."""
        return self._path

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the open file, for reads from any thread; close it after use.

        Raises `StoreUnavailable` when this process does not hold the file (only the
        poller's leader does). Closing the store closes its cursors.
        """
        with self._reader_lock:
            if self._reader is None:
                raise StoreUnavailable(f"{self._path} is not open in this process")
            return self._reader.cursor()

    def worker_pids(self) -> list[int]:
        """The conversion workers' process ids (their RSS counts towards the backend's)."""
        return self._pool.worker_pids() if self._pool is not None else []

    async def open(self) -> None:
        """Open the file (creating it and the missing tables); raises `StoreUnavailable`."""
        async with self._lock:
            if self._db is None:
                await self._in_thread(self._open_sync)
            if self._pool is not None:
                try:
                    await self._pool.start()
                except (OSError, ConversionError):
                    # Converting in a thread is slower, and still correct.
                    log.warning("span store conversion workers did not start", exc_info=True)
                    await self._pool.close()
                    self._pool, self._convert = None, convert_in_thread

    async def close(self) -> None:
        """Close the file, after any write in progress; closing twice is harmless."""
        async with self._lock:
            await self._in_thread(self._close_sync)
            thread, self._thread = self._thread, None
            if thread is not None:
                thread.shutdown(wait=False)  # idle by now: nothing is queued behind the close
            await self._ahead.close()
            if self._pool is not None:
                await self._pool.close()

    async def watermark(self) -> bytes | None:
        """The last WAL key the file holds; b"" for a file that holds none, None if unknown.

        None is a file made by the Go backend (rows but no watermark): the poller then
        resumes from its checkpoint, and the first write records the watermark.
        """
        async with self._lock:
            self._require_open()
            return self._watermark

    def stats(self) -> StoreStats:
        """Totals kept in memory since `open`, and the file's size on disk."""
        return StoreStats(
            spans_stored=self._spans,
            set_aside=self._set_aside,
            size_bytes=self._size(),
            watermark=self._watermark,
        )

    async def _in_thread(self, work: Callable[..., _Result], *args: object) -> _Result:
        """`work(*args)` on the store's thread (made at the first call after a close)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="span-store", initializer=yield_to_auth
            )
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def _converted(self, records: Sequence[SpanRecord]) -> ConvertedBatch:
        """By the converter of the moment (a thread's once the workers failed to start)."""
        return await self._convert(records)

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """The batch likely to be written next: it converts while the current one inserts."""
        self._ahead.prepare(batch)

    async def write(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> StoreWrite:  # noqa: ARG002 (DuckDB commits on its own, before the checkpoint)
        """Store the records above the watermark, committed before this returns.

        Raises `StoreWriteError` (or `StoreUnavailable` when the file cannot be reopened)
        if anything failed: nothing of the batch is then stored, and the batch is retried.
        """
        async with self._lock:
            if self._reopen:
                await self._in_thread(self._reopen_sync)
            self._require_open()
            watermark = self._watermark or b""
            fresh = [record for record in batch if record.key > watermark]
            if not fresh:
                return StoreWrite(stored=0, patches=0, set_aside=0, skipped=len(batch))
            converted = await self._ahead(fresh)
            written = await self._in_thread(self._insert_sync, converted)
        spans_set_aside = sum(1 for row in converted.set_aside if not is_patch_set_aside(row))
        skipped = len(batch) - written.stored - spans_set_aside
        return StoreWrite(written.stored, written.patches, written.set_aside, skipped)

    # -- below here: on a worker thread, one at a time (under self._lock) --

    def _require_open(self) -> None:
        if self._db is None:
            raise StoreUnavailable(f"{self._path} is not open")

    def _size(self) -> int | None:
        try:
            size = self._path.stat().st_size
        except OSError:
            return None
        with contextlib.suppress(OSError):  # DuckDB's write-ahead log, while it has one
            size += self._path.with_name(self._path.name + ".wal").stat().st_size
        return size

    def _open_sync(self) -> None:
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": self._memory_limit,
            "storage_compatibility_version": STORAGE_COMPATIBILITY_VERSION,
            "checkpoint_threshold": checkpoint_threshold(self._memory_limit),
            "threads": 1,
        }
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"{self._path} cannot be opened: {error}") from None
        try:
            db = duckdb.connect(str(self._path), config=config)
        except duckdb.Error as error:
            raise open_failure(self._path, error) from None
        try:
            self._prepare(db)
        except duckdb.Error as error:
            db.close()
            raise open_failure(self._path, error) from None
        with self._reader_lock:
            self._reader = db.cursor()
        self._db = db
        self._reopen = False

    def _prepare(self, db: duckdb.DuckDBPyConnection) -> None:
        """Create the missing tables (as Go does), then read the watermark and the counts."""
        present = {
            row[0]
            for row in db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }
        db.execute("BEGIN TRANSACTION")
        for table, statements in DUCKDB_TABLES.items():
            if table not in present:
                for statement in statements:
                    db.execute(statement)
        if WATERMARK_TABLE not in present and SPANS_TABLE not in present:
            # A file of ours from the start: it holds nothing of the WAL yet.
            db.execute(f"INSERT INTO {WATERMARK_TABLE} VALUES (1, ''::BLOB)")  # noqa: S608 (constant)
        db.execute("COMMIT")
        row = db.execute(_GET_WATERMARK).fetchone()
        self._watermark = None if row is None else bytes(row[0])
        self._spans = _count(db, f"SELECT count(*) FROM {SPANS_TABLE}")  # noqa: S608 (constant)
        self._set_aside = _count(db, f"SELECT count(*) FROM {SET_ASIDE_TABLE}")  # noqa: S608
        if WATERMARK_TABLE not in present and SPANS_TABLE in present:
            log.info(
                "span store adopted a file without a watermark (made by the Go backend?)",
                extra={"path": str(self._path), "spans": self._spans},
            )

    def _close_sync(self) -> None:
        with self._reader_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _reopen_sync(self) -> None:
        self._close_sync()
        self._open_sync()

    def _insert_sync(self, converted: ConvertedBatch) -> StoreWrite:
        db = self._db
        if db is None:  # pragma: no cover (write holds the lock and checked)
            raise StoreUnavailable(f"{self._path} is not open")
        try:
            written = self._transaction(db, converted)
        except Exception as error:
            # A failed statement may have invalidated the database (a full disk does): the
            # next write starts from a fresh connection.
            self._reopen = True
            _rollback(db)
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            if (
                "failed to allocate" in text
            ):  # DuckDB out of memory (its indexes grow with the file)
                text += f" (memory_limit {self._memory_limit} is too small for this file)"
            raise StoreWriteError(f"{self._path}: the batch was not stored: {text}") from error
        self._watermark = converted.last_key
        self._spans += written.stored
        self._set_aside += written.set_aside
        return written

    def _transaction(self, db: duckdb.DuckDBPyConnection, converted: ConvertedBatch) -> StoreWrite:
        """Spans, the patches of the spans actually added, set-asides, the watermark."""
        execute = self._execute
        db.execute("BEGIN TRANSACTION")
        db.register("junjo_new_spans", converted.spans)
        db.register("junjo_new_set_aside", _set_aside_table(converted.set_aside))
        inserted = execute(db, _INSERT_SPANS).fetchall()
        patches = converted.patches
        if len(inserted) < converted.spans.num_rows and patches.num_rows:
            # Some spans were there already (a redelivery, or Go's rows): they keep the
            # patches they have.
            patches = _patches_of(patches, inserted)
        db.register("junjo_new_patches", patches)
        patch_rows = _count_of(execute(db, _INSERT_PATCHES))
        set_aside = _count_of(execute(db, _INSERT_SET_ASIDE))
        execute(db, _SET_WATERMARK, converted.last_key)
        db.execute("COMMIT")
        for name in ("junjo_new_spans", "junjo_new_patches", "junjo_new_set_aside"):
            db.unregister(name)
        # After an error inside a transaction DuckDB's COMMIT reports success and stores
        # nothing: reading the watermark back keeps that from ever passing as a write.
        row = db.execute(_GET_WATERMARK).fetchone()
        if row is None or bytes(row[0]) != converted.last_key:
            raise StoreWriteError("COMMIT reported success but stored nothing")
        return StoreWrite(len(inserted), patch_rows, set_aside, 0)

    @staticmethod
    def _execute(
        db: duckdb.DuckDBPyConnection, sql: str, *params: object
    ) -> duckdb.DuckDBPyConnection:
        """Each statement of a write's transaction (the seam the aborted-commit test breaks)."""
        return db.execute(sql, list(params))


_KEYS_ARROW: Final = pa.schema([("trace_id", pa.string()), ("span_id", pa.string())])


def _patches_of(patches: pa.Table, spans: list[tuple[str, str]]) -> pa.Table:
    """The rows of `patches` whose span is one of `spans` (trace_id, span_id)."""
    if not spans:
        return patches.slice(0, 0)
    keys = pa.Table.from_pylist([{"trace_id": t, "span_id": s} for t, s in spans], _KEYS_ARROW)
    return patches.join(keys, ["trace_id", "span_id"], join_type="left semi")


def _count_of(result: duckdb.DuckDBPyConnection) -> int:
    """The number of rows an INSERT added (its one result row)."""
    row = result.fetchone()
    return int(row[0]) if row else 0


def _rollback(db: duckdb.DuckDBPyConnection) -> None:
    """Roll back whatever is open; a connection DuckDB invalidated refuses that too."""
    try:
        db.execute("ROLLBACK")
    except duckdb.Error:
        log.debug("rollback after a failed span-store write failed too", exc_info=True)
