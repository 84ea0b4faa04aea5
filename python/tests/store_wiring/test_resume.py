"""Where a poller with a span store resumes: the earlier of its checkpoint and the store's
watermark, so the store is never left lacking what the WAL still holds, and no span is
stored twice. A real poller, a real DuckDB file and the real Go peer.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import TYPE_CHECKING

import duckdb

from .conftest import drain, read_checkpoint, wal_keys, write_checkpoint
from .store_files import PATCHES_PER_TRACE, store_rows

if TYPE_CHECKING:
    from .conftest import GoWal

TRACES = 400  # 2,000 spans


async def test_a_deleted_store_file_is_refilled_from_the_wal(go_wal: GoWal) -> None:
    await go_wal.add_traces(TRACES)
    settings = go_wal.settings()
    store = go_wal.folder / "otel_data.db"
    assert await drain(settings, store, go_wal.last_key) == go_wal.total
    assert store_rows(store).spans == go_wal.total

    store.unlink()
    # The checkpoint is at the WAL's end, the new file holds nothing: all is read again.
    assert await read_checkpoint(settings) == go_wal.last_key
    assert await drain(settings, store, go_wal.last_key) == go_wal.total
    rows = store_rows(store)
    assert rows.spans == rows.distinct_spans == go_wal.total
    assert rows.patches == TRACES * PATCHES_PER_TRACE
    assert rows.watermark == go_wal.last_key


async def test_a_store_restored_from_a_backup_gets_what_it_lacks(go_wal: GoWal) -> None:
    first = await go_wal.add_traces(TRACES)
    settings = go_wal.settings()
    store = go_wal.folder / "otel_data.db"
    await drain(settings, store, go_wal.last_key)
    backup = go_wal.folder / "backup.db"
    shutil.copyfile(store, backup)

    second = await go_wal.add_traces(TRACES)
    assert await drain(settings, store, go_wal.last_key) == second.count
    shutil.copyfile(backup, store)  # the store goes back; the checkpoint does not
    assert store_rows(store).watermark == first.last_key

    # Only what the store lacks is read again: from its watermark, not from the start.
    assert await drain(settings, store, go_wal.last_key) == second.count
    rows = store_rows(store)
    assert rows.spans == rows.distinct_spans == go_wal.total
    assert rows.patches == 2 * TRACES * PATCHES_PER_TRACE
    assert rows.watermark == go_wal.last_key


async def test_an_older_checkpoint_replays_only_what_the_store_lacks(go_wal: GoWal) -> None:
    await go_wal.add_traces(TRACES)
    settings = go_wal.settings()
    store = go_wal.folder / "otel_data.db"
    await drain(settings, store, go_wal.last_key)
    before = store_rows(store)
    keys = await wal_keys(settings, go_wal.total)
    older = go_wal.total // 4
    await write_checkpoint(settings, keys[older - 1])  # a SQLite backup from earlier

    # Resumed from the older checkpoint (the earlier of the two): the records the store
    # holds already are skipped by its watermark, and the rows stay as they were.
    assert await drain(settings, store, go_wal.last_key) == go_wal.total - older
    assert store_rows(store) == before
    assert await read_checkpoint(settings) == go_wal.last_key


async def test_a_go_made_file_takes_the_checkpoint_as_its_watermark(go_wal: GoWal) -> None:
    await go_wal.add_traces(TRACES)
    settings = go_wal.settings()
    store = go_wal.folder / "otel_data.db"
    await drain(settings, store, go_wal.last_key)
    # What a Go backend's file is: its rows, and no watermark of ours.
    with contextlib.closing(duckdb.connect(str(store))) as db:
        db.execute("DROP TABLE junjo_store_watermark")
    before = store_rows(store)
    assert before.watermark is None

    # Nothing is replayed over its rows; what comes after the checkpoint is stored.
    more = await go_wal.add_traces(TRACES // 2)
    assert await drain(settings, store, go_wal.last_key) == more.count
    rows = store_rows(store)
    assert rows.spans == rows.distinct_spans == go_wal.total
    assert rows.patches == before.patches + more.count // 5 * PATCHES_PER_TRACE
    assert rows.watermark == go_wal.last_key
