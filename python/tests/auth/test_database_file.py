"""The server's engine and the SQLite file under it: never created after start-up, and a
file replaced (deleted and copied in, or rewritten in place) is noticed at the next read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from junjo_backend.auth.key_store import create_api_key
from junjo_backend.auth.known_keys import KeyStoreUnavailable, KnownKeys
from junjo_backend.database import close_engine, create_engine, open_database

if TYPE_CHECKING:
    from pathlib import Path

    from .auth_calls import KeyRegistry

REPLACED = "the SQLite database file was replaced; reopening every database connection"


def _replacements(caplog: pytest.LogCaptureFixture) -> list[object]:
    return [getattr(r, "how", None) for r in caplog.records if r.getMessage() == REPLACED]


async def test_the_first_start_creates_the_file_and_later_a_missing_file_is_an_error(
    tmp_path: Path, used_keys: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "junjo_backend.database")
    path = tmp_path / "data" / "junjo.db"
    engine = await open_database(f"sqlite+aiosqlite:///{path}")
    writer = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        key = used_keys.add((await create_api_key(writer, "app")).key)
        await close_engine(writer)
        keys = KnownKeys(engine, max_age=0.05, miss_refresh_after=0.05)
        assert await keys.contains(key) is True
        saved = tmp_path / "saved.db"
        shutil.copyfile(path, saved)

        path.unlink()
        assert await keys.refresh() is False
        with pytest.raises(KeyStoreUnavailable):
            await keys.contains(key)
        assert not path.exists()  # the read did not create an empty database
        assert "the SQLite database file is missing" in caplog.text

        shutil.copyfile(saved, path)
        assert await keys.refresh() is True
        assert await keys.contains(key) is True
        assert _replacements(caplog) == ["a file is back at its path"]
    finally:
        await close_engine(engine)
        await close_engine(writer)


async def test_a_file_copied_over_the_path_or_rewritten_in_place_is_read_at_once(
    tmp_path: Path, used_keys: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "junjo_backend.database")
    path = tmp_path / "junjo.db"
    url = f"sqlite+aiosqlite:///{path}"
    engine = await open_database(url)
    writer = create_engine(url)
    try:
        kept = used_keys.add((await create_api_key(writer, "kept")).key)
        saved = tmp_path / "saved.db"
        shutil.copyfile(path, saved)
        revoked = await create_api_key(writer, "revoked later")
        used_keys.add(revoked.key)
        keys = KnownKeys(engine, max_age=0.05, miss_refresh_after=0.05)
        assert await keys.contains(revoked.key) is True

        # Another file at the path: the pool holds the old one open, and is reopened.
        replacement = tmp_path / "replacement.db"
        shutil.copyfile(saved, replacement)
        replacement.replace(path)
        assert await keys.refresh() is True
        assert await keys.contains(revoked.key) is False
        assert await keys.contains(kept) is True

        # The same file, rewritten in place with an older copy: its change counter goes back.
        newer = await create_api_key(writer, "newer")
        used_keys.add(newer.key)
        await asyncio.sleep(0.06)
        assert await keys.contains(newer.key) is True
        path.write_bytes(saved.read_bytes())
        assert await keys.refresh() is True
        assert await keys.contains(newer.key) is False
        # Both engines saw the new file (the writer too: it would have written to the
        # deleted one); only the reader looked after the rewrite in place.
        assert _replacements(caplog) == [
            "another file at its path",
            "another file at its path",
            "rewritten in place",
        ]
    finally:
        await close_engine(engine)
        await close_engine(writer)


async def test_the_watch_keeps_the_locks_of_a_transaction_under_way(tmp_path: Path) -> None:
    # SQLite's locks are POSIX record locks: closing any descriptor of the file in this
    # process releases them all. The watch reads the file's header at every checkout, so
    # it must not do that through a descriptor it then closes.
    path = tmp_path / "junjo.db"
    engine = await open_database(f"sqlite+aiosqlite:///{path}")
    other_process = [
        sys.executable,
        "-c",
        (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
            " c.execute('BEGIN IMMEDIATE'); print('got the write lock')"
        ),
        str(path),
    ]
    try:
        async with engine.begin() as writing:
            await writing.execute(text("UPDATE poller_state SET last_key = x'00'"))
            async with engine.connect() as reading:  # a second checkout: the watch looks
                await reading.execute(text("SELECT 1"))
            outcome = await asyncio.to_thread(
                subprocess.run, other_process, capture_output=True, text=True, check=False
            )
    finally:
        await close_engine(engine)
    assert "got the write lock" not in outcome.stdout
    assert "database is locked" in outcome.stderr


UNREADABLE = "cannot read the SQLite database file to check whether it was replaced"


async def test_a_file_the_watch_cannot_read_is_said_once_until_it_can_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A folder at the path opens for reading, but reading its header fails (EISDIR): a
    # real OSError inside the watch, with no mock.
    caplog.set_level(logging.WARNING, "junjo_backend.database")
    path = tmp_path / "junjo.db"
    engine = await open_database(f"sqlite+aiosqlite:///{path}")
    saved = tmp_path / "saved.db"
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        shutil.copyfile(path, saved)

        def unreadable_looks() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage().startswith(UNREADABLE)]

        for _ in range(2):  # once per stretch, however many checkouts look
            path.unlink()
            path.mkdir()
            for _ in range(3):
                with contextlib.suppress(Exception):  # SQLite's own failure, if any
                    async with engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
            path.rmdir()
            shutil.copyfile(saved, path)
            async with engine.connect() as conn:  # readable again
                await conn.execute(text("SELECT 1"))
        looks = unreadable_looks()
        assert len(looks) == 2
        assert looks[0].__dict__["path"] == str(path)
        assert "IsADirectoryError" in str(looks[0].__dict__["error"])
    finally:
        await close_engine(engine)
