"""Every spelling of a SQLite `DATABASE_URL` that names a file gets what a plain path gets.

The file watch (a backup restored under the server is read at once: a revoked key is
refused, a new one validates), the read-write open that never creates the file after
start-up, and the leader lock beside the file itself. Spellings that cannot name one file
every process agrees on are refused with one `error: DATABASE_URL: ...` line, exit 2
(issue 20: with a `file:` URI a revoked key validated 428 times of 428 after a restore).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from junjo_backend.auth.key_store import create_api_key, revoke_api_key
from junjo_backend.auth.known_keys import KnownKeys
from junjo_backend.database import close_engine, create_engine, open_database, sqlite_database
from junjo_backend.poller.leadership import lock_file_for
from junjo_backend.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .auth_calls import KeyRegistry

# How each accepted spelling names `folder/data/junjo.db` (run with `folder` as the working
# folder, so the relative ones name the same file).
SPELLINGS: dict[str, Callable[[Path], str]] = {
    "plain absolute path": lambda folder: f"sqlite+aiosqlite:///{folder}/data/junjo.db",
    "relative path": lambda _folder: "sqlite+aiosqlite:///data/junjo.db",
    "file: URI": lambda folder: f"sqlite+aiosqlite:///file:{folder}/data/junjo.db?uri=true",
    "file:/// URI": lambda folder: f"sqlite+aiosqlite:///file://{folder}/data/junjo.db?uri=true",
    "file://localhost URI": lambda folder: (
        f"sqlite+aiosqlite:///file://localhost{folder}/data/junjo.db?uri=true"
    ),
    "relative file: URI": lambda _folder: "sqlite+aiosqlite:///file:data/junjo.db?uri=1",
    "file: URI, mode=rwc": lambda folder: (
        f"sqlite+aiosqlite:///file:{folder}/data/junjo.db?uri=true&mode=rwc&cache=private"
    ),
    "symlink": lambda folder: f"sqlite+aiosqlite:///{folder}/link.db",
    "file: URI through a symlink": lambda folder: (
        f"sqlite+aiosqlite:///file:{folder}/link.db?uri=true"
    ),
}

REFUSED = {
    "sqlite:///:memory:": ("sqlite+aiosqlite:///:memory:", "in-memory"),
    "sqlite:// (no path)": ("sqlite+aiosqlite://", "in-memory"),
    "file::memory:": ("sqlite+aiosqlite:///file::memory:?uri=true", "in-memory"),
    "mode=memory": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&mode=memory", "in-memory"),
    "mode=ro": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&mode=ro", "mode=ro"),
    "cache=shared": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&cache=shared", "shared"),
    "vfs=": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&vfs=unix-none", "vfs=unix-none"),
    "immutable=1": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&immutable=1", "immutable"),
    "nolock=1": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&nolock=1", "nolock"),
    "mode= without uri=true": ("sqlite+aiosqlite:///data/junjo.db?mode=ro", "uri=true"),
    "mode= on a plain path with uri=true": (
        "sqlite+aiosqlite:///data/junjo.db?uri=true&mode=ro",
        "uri=true",
    ),
    "file: without uri=true": ("sqlite+aiosqlite:///file:/x/junjo.db", "needs ?uri=true"),
    "an encoded '?' in a file: URI": (
        "sqlite+aiosqlite:///file:/x/a%3Fb.db?uri=true",
        "decode it again",
    ),
    "an encoded '%' in a file: URI": (
        "sqlite+aiosqlite:///file:/x/a%2520b.db?uri=true",
        "decode it again",
    ),
    "another host": ("sqlite+aiosqlite:///file://elsewhere/x/junjo.db?uri=true", "localhost"),
    "uri given twice": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=true&uri=1", "twice"),
    "uri=maybe": ("sqlite+aiosqlite:///file:/x/junjo.db?uri=maybe", "true or false"),
}


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding data/junjo.db (made by a plain-path engine) and link.db -> it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.db").symlink_to(tmp_path / "data" / "junjo.db")
    return tmp_path


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_each_spelling_of_the_file_sees_a_restored_backup_and_takes_the_same_lock(
    spelling: str, folder: Path, used_keys: KeyRegistry
) -> None:
    database = folder / "data" / "junjo.db"
    url = SPELLINGS[spelling](folder)
    named = sqlite_database(url)
    assert named is not None
    assert named.real_path == database
    assert lock_file_for(named.path) == folder / "data" / ".junjo.db.poller-lock"

    engine = await open_database(url)  # the first start creates the file
    writer = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        first = await create_api_key(writer, "before the restore")
        used_keys.add(first.key)
        keys = KnownKeys(engine, max_age=0.05, miss_refresh_after=0.05)
        assert await keys.contains(first.key) is True
        backup = folder / "backup.db"
        shutil.copyfile(database, backup)

        # The restore of the issue: the file removed, then the backup copied back.
        database.unlink()
        assert await keys.refresh() is False
        assert not database.exists()  # the read-write open did not create an empty one
        shutil.copyfile(backup, database)
        await close_engine(writer)
        writer = create_engine(f"sqlite+aiosqlite:///{database}")
        assert await revoke_api_key(writer, first.id) is True
        new = await create_api_key(writer, "after the restore")
        used_keys.add(new.key)

        assert await keys.refresh() is True
        assert await keys.contains(first.key) is False
        assert await keys.contains(new.key) is True
    finally:
        await close_engine(engine)
        await close_engine(writer)


async def test_a_symlink_replaced_by_a_file_is_followed(
    folder: Path, used_keys: KeyRegistry
) -> None:
    # The watch follows the name at every look: `rm link.db; cp backup link.db` replaces
    # the symlink with a file of its own, and the server reads that file from then on.
    database = folder / "data" / "junjo.db"
    link = folder / "link.db"
    engine = await open_database(f"sqlite+aiosqlite:///file:{link}?uri=true")
    try:
        writer = create_engine(f"sqlite+aiosqlite:///{database}")
        try:
            first = await create_api_key(writer, "in the linked file")
            used_keys.add(first.key)
        finally:
            await close_engine(writer)
        keys = KnownKeys(engine, max_age=0.05, miss_refresh_after=0.05)
        assert await keys.contains(first.key) is True
        link.unlink()
        shutil.copyfile(database, link)
        writer = create_engine(f"sqlite+aiosqlite:///{link}")
        try:
            assert await revoke_api_key(writer, first.id) is True
        finally:
            await close_engine(writer)
        assert await keys.refresh() is True
        assert await keys.contains(first.key) is False
    finally:
        await close_engine(engine)


async def test_percent_encoding_in_a_file_uri_is_decoded_once(folder: Path) -> None:
    engine = await open_database(f"sqlite+aiosqlite:///file:{folder}/my%20keys.db?uri=true")
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM api_keys")) == 0
    finally:
        await close_engine(engine)
    assert (folder / "my keys.db").is_file()
    assert _names(folder) == ["link.db", "my keys.db"]


async def test_a_file_uri_with_mode_rw_is_never_created(folder: Path) -> None:
    database = folder / "data" / "junjo.db"
    with pytest.raises(Exception, match="unable to open database file"):
        await open_database(f"sqlite+aiosqlite:///file:{database}?uri=true&mode=rw")
    assert not database.exists()
    assert not database.parent.exists()


@pytest.mark.parametrize("case", REFUSED)
def test_spellings_that_name_no_one_file_are_refused_as_settings(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, reason = REFUSED[case]
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    message = str(refused.value)
    assert message.startswith("DATABASE_URL: ")
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("command", [["serve"], ["api-keys", "list"]])
def test_a_refused_spelling_is_one_error_line_and_exit_2(
    command: list[str], tmp_path: Path
) -> None:
    env = {"DATABASE_URL": "sqlite+aiosqlite:///file::memory:?uri=true", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "junjo_backend", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: DATABASE_URL: an in-memory SQLite database")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_read_command_on_a_missing_file_named_by_a_file_uri_creates_nothing(
    tmp_path: Path,
) -> None:
    # The CLI's "no database here" check asks the same resolver: before, a `file:` URI
    # skipped it, and `api-keys list` made an empty database where the real one was missing.
    database = tmp_path / "data" / "junjo.db"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///file:{database}?uri=true", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "junjo_backend", "api-keys", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: DATABASE_URL: no database at {database} ")
    assert not database.exists()
    assert not database.parent.exists()
