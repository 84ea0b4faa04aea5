"""Every golden batch through `DuckDBStore.write`, the poller's path: Go's rows, exactly once."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import pytest

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.store.base import StoreWrite
from junjo_backend.store.convert import PATCH_REASON_PREFIX, patch_id
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store.schema import PATCH_COLUMN_NAMES, SPAN_COLUMN_NAMES
from tests.store.golden import batches, canonical, expected, read_table

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord

SPANS = expected("expected-spans.jsonl")
PATCHES = expected("expected-state-patches.jsonl")
BATCHES = batches()


async def write_all(
    path: Path, engine: AsyncEngine, every: list[list[SpanRecord]]
) -> list[StoreWrite]:
    """Open a store on `path`, write each batch inside a checkpoint transaction, close."""
    store = DuckDBStore(path, converter="thread")
    await store.open()
    try:
        writes = []
        for batch in every:
            async with engine.begin() as conn:
                writes.append(await store.write(batch, conn))
        return writes
    finally:
        await store.close()


@dataclass(frozen=True)
class Golden:
    """A file holding every golden batch, written once for the module, and each write's result."""

    path: Path
    writes: list[StoreWrite]

    def copy(self, folder: Path) -> Path:
        """A copy of the file to change (the module's own stays as written)."""
        copied = folder / "otel_data.db"
        shutil.copyfile(self.path, copied)
        return copied


@pytest.fixture(scope="module")
async def golden(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Golden]:
    folder = tmp_path_factory.mktemp("golden")
    engine = create_engine(f"sqlite+aiosqlite:///{folder / 'junjo.db'}")
    await init_schema(engine)
    try:
        path = folder / "otel_data.db"
        yield Golden(path, await write_all(path, engine, BATCHES))
    finally:
        await close_engine(engine, quiet=True)


def stored(path: Path) -> tuple[list[str], list[str]]:
    """Both Go tables, canonical, without patch_id (Go's was random)."""
    spans = read_table(path, "spans", list(SPAN_COLUMN_NAMES))
    patches = read_table(path, "state_patches", list(PATCH_COLUMN_NAMES[1:]))
    return canonical(spans), canonical(patches)


def set_aside_rows(path: Path) -> list[tuple[bytes, str, str, str, bytes, bytes]]:
    with duckdb.connect(str(path), read_only=True) as db:
        rows = db.execute(
            "SELECT wal_key, trace_id, span_id, reason, span_bytes, resource_bytes"
            " FROM junjo_spans_set_aside ORDER BY wal_key, reason"
        ).fetchall()
    return [(bytes(r[0]), r[1], r[2], r[3], bytes(r[4]), bytes(r[5])) for r in rows]


async def test_golden_batches_store_every_column_as_go_did(
    tmp_path: Path, engine: AsyncEngine
) -> None:
    path = tmp_path / "otel_data.db"
    await write_all(path, engine, BATCHES)
    assert list(SPANS[0]) == list(SPAN_COLUMN_NAMES)
    assert list(PATCHES[0]) == list(PATCH_COLUMN_NAMES[1:])
    spans, patches = stored(path)
    assert spans == canonical(SPANS)
    assert patches == canonical(PATCHES)


def test_patch_ids_are_uuid5_of_the_event_index(golden: Golden) -> None:
    path = golden.path
    rows = read_table(path, "state_patches", ["patch_id", "trace_id", "span_id", "patch_json"])
    ids = {(r["trace_id"], r["span_id"], r["patch_json"]): r["patch_id"] for r in rows}
    node = ("10" * 16, "10" * 8)
    # span-16: two set_state events, at positions 0 and 1 among its events.
    assert ids[(*node, '{"x":1}')] == patch_id(*node, 0)
    assert ids[(*node, "{}")] == patch_id(*node, 1)
    # span-13: the set_state event is its first; the other event makes no patch.
    workflow = ("0d" * 16, "0d" * 8)
    assert ids[(*workflow, '[{"op":"add","path":"/a","value":1}]')] == patch_id(*workflow, 0)
    assert len({r["patch_id"] for r in rows}) == len(rows)


def test_what_go_could_not_store_is_set_aside_with_a_reason(golden: Golden) -> None:
    path, writes = golden.path, golden.writes
    rows = set_aside_rows(path)
    by_key = {row[0]: row for row in rows}
    assert len(rows) == 5
    for batch_number, words in (
        (24, "flags 2147483648"),
        (25, "junjo.workflow.state.start"),
        (28, "nan"),
    ):
        record = BATCHES[batch_number - 1][0]
        _, trace_id, span_id, reason, span_bytes, resource_bytes = by_key[record.key]
        assert words in reason
        assert not reason.startswith(PATCH_REASON_PREFIX)
        assert (span_bytes, resource_bytes) == (record.span_bytes, record.resource_bytes)
        span = record.span()
        assert (trace_id, span_id) == (span.trace_id.hex(), span.span_id.hex())
        assert writes[batch_number - 1] == StoreWrite(stored=0, patches=0, set_aside=1, skipped=0)
    for batch_number in (26, 27):
        record = BATCHES[batch_number - 1][0]
        reason = by_key[record.key][3]
        assert reason.startswith(PATCH_REASON_PREFIX)
        assert "junjo.state_json_patch" in reason
    assert writes[25] == StoreWrite(stored=1, patches=0, set_aside=1, skipped=0)
    assert writes[26] == StoreWrite(stored=2, patches=0, set_aside=1, skipped=0)


def test_duplicates_in_a_batch_and_later_are_kept_once(golden: Golden) -> None:
    writes = golden.writes
    assert writes[29] == StoreWrite(stored=1, patches=1, set_aside=0, skipped=1)  # batch 30
    assert writes[30] == StoreWrite(stored=0, patches=0, set_aside=0, skipped=1)  # batch 31


async def test_redelivering_every_batch_adds_nothing(
    golden: Golden, tmp_path: Path, engine: AsyncEngine
) -> None:
    path = golden.copy(tmp_path)
    before = (stored(path), set_aside_rows(path))
    again = await write_all(path, engine, BATCHES)
    assert again == [StoreWrite(0, 0, 0, skipped=len(batch)) for batch in BATCHES]
    assert (stored(path), set_aside_rows(path)) == before


async def test_redelivery_under_a_lost_watermark_adds_nothing(
    golden: Golden, tmp_path: Path, engine: AsyncEngine
) -> None:
    # A file restored from a backup, say: its watermark is behind the rows it holds. The
    # rows themselves then keep the redelivery out (spans by key, patches by their span).
    path = golden.copy(tmp_path)
    before = (stored(path), set_aside_rows(path))
    with duckdb.connect(str(path)) as db:
        db.execute("UPDATE junjo_store_watermark SET last_key = ''::BLOB")
    again = await write_all(path, engine, BATCHES)
    assert sum(w.stored + w.patches + w.set_aside for w in again) == 0
    assert (stored(path), set_aside_rows(path)) == before


async def test_stats_count_what_the_file_holds(golden: Golden, tmp_path: Path) -> None:
    path = golden.copy(tmp_path)
    store = DuckDBStore(path, converter="thread")
    await store.open()
    try:
        stats = store.stats()
        assert stats.spans_stored == len(SPANS)
        assert stats.set_aside == 5
        assert stats.watermark == BATCHES[-1][-1].key
        assert await store.watermark() == BATCHES[-1][-1].key
        assert stats.size_bytes is not None
        assert stats.size_bytes > 0
    finally:
        await store.close()
