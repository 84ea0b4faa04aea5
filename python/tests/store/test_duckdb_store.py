"""DuckDBStore on real files: format, adoption, watermark, locking, aborted commits, reopen."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest

from junjo_backend.store import duckdb_store
from junjo_backend.store.base import StoreUnavailable, StoreWrite
from junjo_backend.store.duckdb_store import (
    DEFAULT_MEMORY_LIMIT,
    DuckDBStore,
    StoreWriteError,
    checkpoint_threshold,
)
from junjo_backend.store.schema import DUCKDB_TABLES
from tests.store.records import key, record, set_state

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.spans import SpanRecord

# The storage version number DuckDB 1.0 and 1.1 write in a file's header (and read).
DUCKDB_1_STORAGE_VERSION = 64


async def write(store: DuckDBStore, engine: AsyncEngine, batch: list[SpanRecord]) -> StoreWrite:
    async with engine.begin() as conn:
        return await store.write(batch, conn)


def count(path: Path, table: str) -> int:
    with duckdb.connect(str(path), read_only=True) as db:
        row = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row[0])


async def test_a_new_file_is_in_the_storage_format_duckdb_1_1_reads(tmp_path: Path) -> None:
    path = tmp_path / "otel_data.db"
    store = DuckDBStore(path, converter="thread")
    await store.open()
    await store.close()
    header = path.read_bytes()[:20]
    assert header[8:12] == b"DUCK"
    assert struct.unpack("<Q", header[12:20])[0] == DUCKDB_1_STORAGE_VERSION
    with duckdb.connect(str(path), read_only=True) as db:
        row = db.execute("SELECT tags FROM duckdb_databases() WHERE NOT internal").fetchone()
    assert row is not None
    assert row[0]["storage_version"].startswith("v1.0.0")


async def test_a_new_file_holds_nothing_of_the_wal(store: DuckDBStore) -> None:
    # b"": resume from the WAL's start (a deleted store is refilled), not from the checkpoint.
    assert await store.watermark() == b""
    assert store.stats().spans_stored == 0


def make_go_file(path: Path) -> str:
    """A file as the Go backend leaves it: its two tables, a span with a patch, no watermark."""
    go_patch = str(uuid.uuid4())
    with duckdb.connect(str(path)) as db:
        for table in ("spans", "state_patches"):
            for statement in DUCKDB_TABLES[table]:
                db.execute(statement)
        first = record(1).span()
        trace_id, span_id = first.trace_id.hex(), first.span_id.hex()
        db.execute(
            "INSERT INTO spans (trace_id, span_id, service_name, name, start_time, end_time)"
            " VALUES (?, ?, 'go', 'from go', now(), now())",
            [trace_id, span_id],
        )
        db.execute(
            "INSERT INTO state_patches VALUES (?, 'go', ?, ?, '', '', now(), '{}', '')",
            [go_patch, trace_id, span_id],
        )
    return go_patch


async def test_a_go_made_file_is_adopted_as_it_is(tmp_path: Path, engine: AsyncEngine) -> None:
    path = tmp_path / "otel_data.db"
    go_patch = make_go_file(path)
    store = DuckDBStore(path, converter="thread")
    await store.open()
    try:
        assert await store.watermark() is None  # the poller takes its checkpoint
        assert store.stats().spans_stored == 1
        # Record 1 is the Go row again (replayed from before the checkpoint): kept as Go
        # stored it, its patch not duplicated.
        batch = [record(1, events=[set_state("{}")]), record(2, events=[set_state("{}")])]
        assert await write(store, engine, batch) == StoreWrite(1, 1, 0, skipped=1)
        assert await store.watermark() == key(2)
    finally:
        await store.close()
    with duckdb.connect(str(path), read_only=True) as db:
        assert db.execute("SELECT name FROM spans ORDER BY name").fetchall() == [
            ("from go",),
            ("s",),
        ]
        patches = db.execute(
            "SELECT patch_id, service_name FROM state_patches ORDER BY 2"
        ).fetchall()
    assert len(patches) == 2
    assert (go_patch, "go") in patches


async def test_records_at_or_below_the_watermark_are_skipped(
    store: DuckDBStore, engine: AsyncEngine
) -> None:
    assert await write(store, engine, [record(1), record(2), record(3)]) == StoreWrite(3, 0, 0, 0)
    # Keys 2 and 3 again, now carrying spans the file does not hold: the watermark alone
    # keeps them out. Key 4 is new.
    again = [record(2, span_n=20), record(3, span_n=30), record(4)]
    assert await write(store, engine, again) == StoreWrite(1, 0, 0, skipped=2)
    assert store.stats().spans_stored == 4
    assert await store.watermark() == key(4)


PYTHON = Path(sys.executable).resolve().name  # the holder's program, as DuckDB names it
HOLDER = (
    "import duckdb, sys; db = duckdb.connect(sys.argv[1]); print(1, flush=True); sys.stdin.read()"
)


@contextlib.contextmanager
def held_by_another_process(path: Path) -> Iterator[int]:
    """Another process (DuckDB in a Python child) holds `path` meanwhile; yields its pid."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"1"
        try:
            yield holder.pid
        finally:
            holder.communicate(b"", timeout=30)


async def test_a_held_file_names_the_file_and_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "otel_data.db"
    with held_by_another_process(path) as pid:
        store = DuckDBStore(path, converter="thread")
        with pytest.raises(StoreUnavailable) as raised:
            await store.open()
    message = str(raised.value)
    assert message == f"{path} is held by another process (pid {pid}, {PYTHON})"
    # Once the holder is gone the same store opens.
    await store.open()
    await store.close()


async def test_an_aborted_transaction_is_never_reported_as_stored(
    store: DuckDBStore, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write(store, engine, [record(1)])
    real_execute = DuckDBStore._execute

    # Our writes never carry on after a failed statement, so only a fault injected here
    # reaches COMMIT inside an aborted transaction: make one statement fail for real (a
    # duplicate key) and swallow every error, as the Go backend did with patch errors.
    def swallowing(
        db: duckdb.DuckDBPyConnection, sql: str, *params: object
    ) -> duckdb.DuckDBPyConnection:
        if sql == duckdb_store._INSERT_PATCHES:
            with contextlib.suppress(duckdb.Error):
                db.execute("INSERT INTO spans SELECT * FROM spans")
        try:
            return real_execute(db, sql, *params)
        except duckdb.Error:
            return duckdb.connect(":memory:").execute("SELECT 0 WHERE false")

    monkeypatch.setattr(DuckDBStore, "_execute", staticmethod(swallowing))
    with pytest.raises(StoreWriteError, match="COMMIT reported success but stored nothing"):
        await write(store, engine, [record(2, events=[set_state("{}")])])
    assert store.stats().spans_stored == 1
    assert await store.watermark() == key(1)
    monkeypatch.setattr(DuckDBStore, "_execute", staticmethod(real_execute))
    assert await write(store, engine, [record(2)]) == StoreWrite(1, 0, 0, 0)


async def test_memory_limit_is_applied(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db", memory_limit="64MB", converter="thread")
    await store.open()
    try:
        assert store._db is not None
        row = store._db.execute("SELECT current_setting('memory_limit')").fetchone()
        assert row is not None
        assert row[0] == "61.0 MiB"  # 64 MB, as DuckDB prints it
    finally:
        await store.close()


async def test_a_closed_store_refuses_to_write(tmp_path: Path, engine: AsyncEngine) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db", converter="thread")
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable, match="is not open"):
        await write(store, engine, [record(1)])
    with pytest.raises(StoreUnavailable, match="is not open"):
        await store.watermark()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (mounting needs root: the test is skipped where it cannot mount)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def remount(mount_point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)


async def write_until_full(
    store: DuckDBStore, engine: AsyncEngine, batches: list[list[SpanRecord]]
) -> tuple[int, StoreWriteError]:
    """How many batches were stored before one failed, and its error."""
    for done, batch in enumerate(batches):
        try:
            await write(store, engine, batch)
        except StoreWriteError as error:
            return done, error
    raise AssertionError("the disk never filled up")


# Where the disk fills: DuckDB's write-ahead log at a commit (the connection survives: the
# store's own threshold, far above the tiny disk), or a checkpoint (DuckDB then invalidates
# the database: only a new connection can go on).
@pytest.mark.parametrize("threshold", [checkpoint_threshold(DEFAULT_MEMORY_LIMIT), "1KB"])
async def test_a_full_disk_fails_the_batch_and_a_later_write_stores_it(
    tiny_disk: Path, engine: AsyncEngine, threshold: str
) -> None:
    path = tiny_disk / "otel_data.db"
    store = DuckDBStore(path, converter="thread")
    await store.open()
    try:
        assert store._db is not None
        store._db.execute(f"SET checkpoint_threshold = '{threshold}'")
        batches = [
            [record(n, padding=2000) for n in range(b * 200, b * 200 + 200)] for b in range(40)
        ]
        done, error = await write_until_full(store, engine, batches)
        assert "No space left on device" in str(error)
        assert store.stats().spans_stored == done * 200
        assert await store.watermark() == (batches[done - 1][-1].key if done else b"")
        # While the disk stays full the batch keeps failing, and nothing moves.
        with pytest.raises((StoreWriteError, StoreUnavailable)):
            await write(store, engine, batches[done])
        # Space returns: the batch is stored (DuckDB may have kept it in its log already,
        # then the watermark skips it), and nothing is missing or doubled.
        remount(tiny_disk, "64m")
        written = await write(store, engine, batches[done])
        assert written.stored + written.skipped == 200
        assert await store.watermark() == batches[done][-1].key
    finally:
        await store.close()
    assert count(path, "spans") == (done + 1) * 200


async def test_a_file_that_is_not_duckdb_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "otel_data.db"
    path.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreUnavailable) as raised:
        await DuckDBStore(path, converter="thread").open()
    message = str(raised.value)
    assert message.startswith(f"{path} cannot be opened: ")
    assert "\n" not in message


async def test_the_files_folder_is_created(tmp_path: Path) -> None:
    path = tmp_path / "dbdata" / "duckdb" / "otel_data.db"
    store = DuckDBStore(path, converter="thread")
    await store.open()
    await store.close()
    assert path.is_file()


async def test_cursors_read_what_writes_committed_and_end_with_the_store(
    store: DuckDBStore, engine: AsyncEngine
) -> None:
    await write(store, engine, [record(1), record(2)])
    cursor = store.cursor()
    assert cursor.execute("SELECT count(*) FROM spans").fetchall() == [(2,)]
    await store.close()
    with pytest.raises(duckdb.ConnectionException):
        cursor.execute("SELECT count(*) FROM spans")
    with pytest.raises(StoreUnavailable, match="is not open in this process"):
        store.cursor()


async def test_running_out_of_memory_names_the_limit(tmp_path: Path, engine: AsyncEngine) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db", memory_limit="16MB", converter="thread")
    await store.open()
    try:
        batch = [record(n, padding=3000, events=[set_state("{}")]) for n in range(6000)]
        with pytest.raises(StoreWriteError, match=r"memory_limit 16MB is too small for this file"):
            await write(store, engine, batch)
        assert store.stats().spans_stored == 0
        assert await store.watermark() == b""
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("memory_limit", "threshold"),
    [("256MB", "16MB"), ("1GB", "62MB"), ("1.5GiB", "101MB"), ("4GB", "250MB"), ("64GB", "256MB")],
)
def test_the_checkpoint_threshold_is_a_sixteenth_of_the_memory_limit(
    memory_limit: str, threshold: str
) -> None:
    # What DuckDB's log holds sits in memory beside the indexes until a checkpoint.
    assert checkpoint_threshold(memory_limit) == threshold


async def test_the_store_opens_duckdb_with_its_limit_and_threshold(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "otel_data.db", memory_limit="1GB", converter="thread")
    await store.open()
    try:
        cursor = store.cursor()
        settings = dict(
            cursor.execute(
                "SELECT name, value FROM duckdb_settings() "
                "WHERE name IN ('memory_limit', 'checkpoint_threshold', 'threads')"
            ).fetchall()
        )
        cursor.close()
    finally:
        await store.close()
    assert settings == {
        "memory_limit": "953.6 MiB",
        "checkpoint_threshold": "59.1 MiB",
        "threads": "1",
    }
