"""Every golden batch through `PostgresStore.write`, inside a real checkpoint transaction on
PostgreSQL: the same rows as the Go backend stored (and as the DuckDB store holds), exactly
once, committed with the checkpoint or not at all."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import text

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.poller.checkpoint import load_checkpoint, save_checkpoint
from junjo_backend.store.base import StoreWrite
from junjo_backend.store.convert import PATCH_REASON_PREFIX, patch_id
from junjo_backend.store.postgres_store import PostgresStore, StoreTransactionError
from junjo_backend.store.schema import PATCH_COLUMN_NAMES, SPAN_COLUMN_NAMES
from tests.store.golden import batches, canonical, expected
from tests.store.records import record, set_state

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord

SPANS = expected("expected-spans.jsonl")
PATCHES = expected("expected-state-patches.jsonl")
BATCHES = batches()
TIMES = {"start_time", "end_time", "event_time"}


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_url)
    await init_schema(engine)
    yield engine
    await close_engine(engine, quiet=True)


@pytest.fixture
async def store(engine: AsyncEngine) -> PostgresStore:
    store = PostgresStore(engine, converter="thread")
    await store.open()
    return store


async def write_all(
    engine: AsyncEngine, store: PostgresStore, every: list[list[SpanRecord]]
) -> list[StoreWrite]:
    """Each batch and its checkpoint in one transaction, as the poller commits them."""
    writes = []
    for batch in every:
        async with engine.begin() as conn:
            writes.append(await store.write(batch, conn))
            await save_checkpoint(conn, batch[-1].key)
    return writes


def _golden_text(column: str, value: object) -> object:
    if column in TIMES and isinstance(value, int):
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=value)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


async def read_table(engine: AsyncEngine, table: str, columns: list[str]) -> list[dict[str, Any]]:
    """Every row, times as the golden files write them, JSON as its stored text."""
    types: dict[str, str] = {}
    async with engine.connect() as conn:
        found = await conn.execute(
            text(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = :t"
            ),
            {"t": table},
        )
        types = dict(found.all())
        select = ", ".join(
            f"(extract(epoch FROM {c}) * 1000000)::bigint"
            if c in TIMES
            else (f"{c}::text" if types[c] == "json" else c)
            for c in columns
        )
        rows = (await conn.execute(text(f"SELECT {select} FROM {table}"))).all()  # noqa: S608
        return [{c: _golden_text(c, v) for c, v in zip(columns, row, strict=True)} for row in rows]


async def stored(engine: AsyncEngine) -> tuple[list[str], list[str]]:
    spans = await read_table(engine, "spans", list(SPAN_COLUMN_NAMES))
    patches = await read_table(engine, "state_patches", list(PATCH_COLUMN_NAMES[1:]))
    return canonical(spans), canonical(patches)


async def _set_aside(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT wal_key, trace_id, span_id, reason, span_bytes, resource_bytes "
                "FROM junjo_spans_set_aside ORDER BY wal_key, reason"
            )
        )
        return [tuple(row) for row in result]


async def test_the_tables_have_go_columns_in_postgresql_types(
    engine: AsyncEngine, store: PostgresStore
) -> None:
    async with engine.connect() as conn:
        columns = (
            await conn.execute(
                text(
                    "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                    "WHERE table_name = 'spans' ORDER BY ordinal_position"
                )
            )
        ).all()
        fks = (
            await conn.execute(
                text(
                    "SELECT confrelid::regclass::text, conkey, confkey FROM pg_constraint "
                    "WHERE conrelid = 'state_patches'::regclass AND contype = 'f'"
                )
            )
        ).all()
        indexes = set(
            (
                await conn.execute(
                    text(
                        "SELECT indexname FROM pg_indexes "
                        "WHERE tablename IN ('spans', 'state_patches')"
                    )
                )
            ).scalars()
        )
    assert [c[0] for c in columns] == list(SPAN_COLUMN_NAMES)
    kinds = {name: kind for name, kind, _ in columns}
    assert kinds["trace_id"] == "text"
    assert kinds["start_time"] == "timestamp with time zone"
    assert kinds["attributes_json"] == "json"  # not jsonb: the stored text stays Go's
    assert kinds["trace_flags"] == "integer"
    assert [fk[0] for fk in fks] == ["spans"]
    assert {
        "idx_trace_id",
        "idx_parent_span_id",
        "idx_start_time",
        "idx_end_time",
        "idx_junjo_id",
        "idx_junjo_span_type",
        "idx_state_patches_trace_id_span_id",
        "idx_state_patches_workflow_id",
        "idx_state_patches_node_id",
        "idx_state_patches_event_time",
        "junjo_idx_spans_service_start",
        "junjo_idx_spans_service_roots",
    } <= indexes
    await store.open()  # again, as every replica does at start: nothing changes, no error


async def test_golden_batches_store_the_same_rows_as_go(
    engine: AsyncEngine, store: PostgresStore
) -> None:
    writes = await write_all(engine, store, BATCHES)
    spans, patches = await stored(engine)
    assert spans == canonical(SPANS)
    assert patches == canonical(PATCHES)
    assert writes[29] == StoreWrite(stored=1, patches=1, set_aside=0, skipped=1)  # batch 30
    assert writes[30] == StoreWrite(stored=0, patches=0, set_aside=0, skipped=1)  # batch 31
    assert writes[25] == StoreWrite(stored=1, patches=0, set_aside=1, skipped=0)
    rows = await _set_aside(engine)
    assert len(rows) == 5
    record = BATCHES[23][0]  # batch 24: flags beyond int32
    [row] = [r for r in rows if bytes(r[0]) == record.key]
    assert "flags 2147483648" in row[3]
    assert not row[3].startswith(PATCH_REASON_PREFIX)
    assert (bytes(row[4]), bytes(row[5])) == (record.span_bytes, record.resource_bytes)
    assert store.stats().spans_stored == len(SPANS)
    assert store.stats().set_aside == 5


async def test_patch_ids_are_the_same_uuid5(engine: AsyncEngine, store: PostgresStore) -> None:
    await write_all(engine, store, BATCHES)
    rows = await read_table(engine, "state_patches", ["patch_id", "trace_id", "span_id"])
    node = ("10" * 16, "10" * 8)
    assert patch_id(*node, 0) in {r["patch_id"] for r in rows}
    assert len({r["patch_id"] for r in rows}) == len(rows)


async def test_redelivering_every_batch_adds_nothing(
    engine: AsyncEngine, store: PostgresStore
) -> None:
    await write_all(engine, store, BATCHES)
    before = (await stored(engine), await _set_aside(engine))
    again = await write_all(engine, store, BATCHES)
    assert again == [StoreWrite(0, 0, 0, skipped=len(batch)) for batch in BATCHES]
    assert (await stored(engine), await _set_aside(engine)) == before
    assert store.stats().spans_stored == len(SPANS)


async def test_a_rolled_back_checkpoint_takes_the_spans_with_it(
    engine: AsyncEngine, store: PostgresStore
) -> None:
    class CheckpointFailedError(Exception):
        pass

    async def write_then_fail() -> None:
        async with engine.begin() as conn:
            written = await store.write(BATCHES[0], conn)
            assert written.stored == len(BATCHES[0])
            raise CheckpointFailedError

    with pytest.raises(CheckpointFailedError):
        await write_then_fail()
    assert await stored(engine) == ([], [])
    assert store.stats().spans_stored == 0
    async with engine.connect() as conn:
        assert await load_checkpoint(conn) is None
    # The retry stores the batch: the staging tables held nothing over.
    assert (await write_all(engine, store, BATCHES[:1]))[0].stored == len(BATCHES[0])
    assert store.stats().spans_stored == len(BATCHES[0])


async def test_a_write_outside_a_transaction_is_refused(
    engine: AsyncEngine, store: PostgresStore
) -> None:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(StoreTransactionError):
            await store.write(BATCHES[0], conn)
    assert await stored(engine) == ([], [])


async def test_a_stored_span_keeps_its_patches(engine: AsyncEngine, store: PostgresStore) -> None:
    # The same span again, now with a second set_state event: the span is not added, and
    # neither is the new patch (its id is new), as in the DuckDB store.
    first = record(1, events=[set_state('{"a":1}')])
    again = record(2, span_n=1, events=[set_state('{"a":1}'), set_state('{"b":2}')])
    writes = await write_all(engine, store, [[first], [again]])
    assert writes == [StoreWrite(1, 1, 0, 0), StoreWrite(0, 0, 0, 1)]
    assert len((await stored(engine))[1]) == 1
