"""The PostgreSQL span store: spans written in the fenced checkpoint's own transaction.

`write` gets the poller's `AsyncConnection` inside its checkpoint transaction: the rows are
COPYed (CSV, straight from the conversion's Arrow tables) into temporary staging tables
and moved with `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so duplicates within a
batch and across batches (redeliveries) are dropped. The batch commits with the checkpoint
or not at all, on whichever replica leads: no watermark is needed. Every replica reads.
See `docs/design/span-store.md` and `docs/design/span-api.md`.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any, Final, Literal

import pyarrow.csv as pa_csv
from sqlalchemy import event, text

from junjo_backend.store.api import PostgresReader
from junjo_backend.store.base import StoreStats, StoreWrite
from junjo_backend.store.convert import PATCH_REASON_PREFIX
from junjo_backend.store.process_pool import AheadConverter, ProcessConverter, convert_in_thread
from junjo_backend.store.schema import (
    PATCH_COLUMN_NAMES,
    POSTGRES_DDL,
    SET_ASIDE_TABLE,
    SPAN_COLUMN_NAMES,
    SPANS_TABLE,
    STATE_PATCHES_TABLE,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pyarrow as pa
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.store.process_pool import Converter

log = logging.getLogger(__name__)

# Any constant: serializes the CREATE ... IF NOT EXISTS of replicas starting together
# (two concurrent ones can both miss the table, and one then fails).
_DDL_LOCK: Final = 0x6A756E6A6F5F7370  # "junjo_sp"
_STAGE_SPANS: Final = "junjo_stage_spans"
_STAGE_PATCHES: Final = "junjo_stage_patches"
_STAGE_ADDED: Final = "junjo_stage_added"
_STAGE_SET_ASIDE: Final = "junjo_stage_set_aside"
_SET_ASIDE_COLUMNS: Final = ("wal_key", "trace_id", "span_id", "reason", "span_bytes")
_SET_ASIDE_COLUMNS_ALL: Final = (*_SET_ASIDE_COLUMNS, "resource_bytes")

# Session-local staging tables, emptied at every commit (and gone with a rollback's rows).
_STAGING: Final = tuple(
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({shape}) ON COMMIT DELETE ROWS"
    for stage, shape in (
        (_STAGE_SPANS, f"LIKE {SPANS_TABLE}"),
        (_STAGE_PATCHES, f"LIKE {STATE_PATCHES_TABLE}"),
        (_STAGE_ADDED, "trace_id text, span_id text"),
        (_STAGE_SET_ASIDE, f"LIKE {SET_ASIDE_TABLE} INCLUDING DEFAULTS"),
    )
)
_SPAN_LIST: Final = ", ".join(SPAN_COLUMN_NAMES)
_PATCH_LIST: Final = ", ".join(PATCH_COLUMN_NAMES)
# The spans actually added (not already stored) are remembered: only they get patches, as
# in the DuckDB store (a stored span keeps the patches it has).
_INSERT_SPANS: Final = (
    f"WITH added AS (INSERT INTO {SPANS_TABLE} ({_SPAN_LIST}) "  # noqa: S608 (constants)
    f"SELECT {_SPAN_LIST} FROM {_STAGE_SPANS} ON CONFLICT DO NOTHING "
    f"RETURNING trace_id, span_id) INSERT INTO {_STAGE_ADDED} SELECT trace_id, span_id FROM added"
)
_INSERT_PATCHES: Final = (
    f"INSERT INTO {STATE_PATCHES_TABLE} ({_PATCH_LIST}) "  # noqa: S608 (constants)
    f"SELECT {', '.join('p.' + name for name in PATCH_COLUMN_NAMES)} "
    f"FROM {_STAGE_PATCHES} AS p JOIN {_STAGE_ADDED} USING (trace_id, span_id) "
    "ON CONFLICT DO NOTHING"
)
_INSERT_SET_ASIDE: Final = (
    f"INSERT INTO {SET_ASIDE_TABLE} ({', '.join(_SET_ASIDE_COLUMNS_ALL)}) "  # noqa: S608
    f"SELECT {', '.join(_SET_ASIDE_COLUMNS_ALL)} FROM {_STAGE_SET_ASIDE} ON CONFLICT DO NOTHING "
    "RETURNING reason"
)


class StoreTransactionError(RuntimeError):
    """The write was handed a connection outside a transaction (a wiring fault)."""


def _csv(table: pa.Table) -> io.BytesIO:
    """`table` as PostgreSQL's CSV: strings always quoted ('' is ""), NULL left empty."""
    buffer = io.BytesIO()
    pa_csv.write_csv(table, buffer, pa_csv.WriteOptions(include_header=False))
    buffer.seek(0)
    return buffer


class PostgresStore:
    """A `SpanStore` in the backend's PostgreSQL database; see the module docstring."""

    def __init__(
        self, engine: AsyncEngine, *, converter: Literal["process", "thread"] = "process"
    ) -> None:
        self._engine = engine
        # As in the DuckDB store: large batches convert in worker processes (the leader
        # starts them at open), so the event loop keeps serving auth.
        self._pool = ProcessConverter() if converter == "process" else None
        self._convert: Converter = self._pool or convert_in_thread
        # The next batch converts while this one is written (process_pool.AheadConverter).
        self._ahead = AheadConverter(self._convert)
        self._spans = 0
        self._set_aside = 0

    def reader(self) -> PostgresReader:
        """What serves the read API: every replica reads, through its own engine."""
        return PostgresReader(self._engine)

    async def open(self) -> None:
        """Create the missing tables and indexes (idempotent), and count what is stored."""
        async with self._engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})
            for statement in POSTGRES_DDL:
                await conn.execute(text(statement))
            self._spans = await _count(conn, SPANS_TABLE)
            self._set_aside = await _count(conn, SET_ASIDE_TABLE)
        if self._pool is not None:
            await self._pool.start()

    async def close(self) -> None:
        """Stop the conversion workers; no connection is held between writes."""
        await self._ahead.close()
        if self._pool is not None:
            await self._pool.close()

    def worker_pids(self) -> list[int]:
        """The conversion workers' process ids (their RSS counts towards the backend's)."""
        return self._pool.worker_pids() if self._pool is not None else []

    async def watermark(self) -> bytes | None:
        """None: the spans commit with the checkpoint, so the checkpoint is the resume point."""
        return None

    def stats(self) -> StoreStats:
        """Totals counted at `open`, plus what this process has written since."""
        return StoreStats(
            spans_stored=self._spans, set_aside=self._set_aside, size_bytes=None, watermark=None
        )

    def _counter(self, stored: int, set_aside: int) -> Callable[[object], None]:
        def committed(_conn: object) -> None:
            self._spans += stored
            self._set_aside += set_aside

        return committed

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """The batch likely to be written next: it converts while the current one is written."""
        self._ahead.prepare(batch)

    async def write(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> StoreWrite:
        """Stage and insert the batch through `conn`; it commits with the checkpoint."""
        converted = await self._ahead(batch)
        for statement in _STAGING:
            await conn.execute(text(statement))
        driver = await _driver(conn)
        await driver.copy_to_table(
            _STAGE_SPANS, source=_csv(converted.spans), columns=SPAN_COLUMN_NAMES, format="csv"
        )
        if converted.patches.num_rows:
            await driver.copy_to_table(
                _STAGE_PATCHES,
                source=_csv(converted.patches),
                columns=PATCH_COLUMN_NAMES,
                format="csv",
            )
        if converted.set_aside:
            records = [
                (row.key, row.trace_id, row.span_id, row.reason, row.span_bytes, row.resource_bytes)
                for row in converted.set_aside
            ]
            await driver.copy_records_to_table(
                _STAGE_SET_ASIDE, records=records, columns=_SET_ASIDE_COLUMNS_ALL
            )
        stored = (await conn.execute(text(_INSERT_SPANS))).rowcount
        patches = (await conn.execute(text(_INSERT_PATCHES))).rowcount
        reasons = (await conn.execute(text(_INSERT_SET_ASIDE))).scalars().all()
        set_aside = len(reasons)
        # Counted when the poller's transaction commits (a rolled-back batch is retried).
        event.listen(conn.sync_connection, "commit", self._counter(stored, set_aside), once=True)
        # A span set aside before (a redelivery) was skipped like a span stored before.
        spans_set_aside = sum(1 for reason in reasons if not reason.startswith(PATCH_REASON_PREFIX))
        skipped = len(batch) - stored - spans_set_aside
        return StoreWrite(stored, patches, set_aside, skipped)


async def _driver(conn: AsyncConnection) -> Any:  # noqa: ANN401 (asyncpg ships no types)
    """The asyncpg connection under `conn`, checked to be inside its transaction."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if driver is None or not driver.is_in_transaction():
        # COPY outside the checkpoint's transaction would commit on its own.
        raise StoreTransactionError("the span store's COPY must run inside a transaction")
    return driver


async def _count(conn: AsyncConnection, table: str) -> int:
    result = await conn.execute(text(f"SELECT count(*) FROM {table}"))  # noqa: S608 (constant)
    return int(result.scalar_one())
