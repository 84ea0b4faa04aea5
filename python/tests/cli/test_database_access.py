"""A database folder this process cannot write (a root-owned bind mount, the image's uid).

The Go backend's deployments bind-mount folders that root owns, and the image runs as uid
10001: the start-up must say which folder, which uid, and how to fix it, not SQLite's
"unable to open database file". The commands run in a subprocess as another uid (`nobody`
through setpriv when we are root; as ourselves with the folder made read-only otherwise).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.postgres_cluster import as_user

from .test_operator_errors import _QUIET_PORTS, _SETTING_NAMES, first_error_line

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def dbdata() -> Iterator[Path]:
    """`dbdata/sqlite`, as the Go backend's compose leaves it: a folder of someone else's.

    Under /tmp, which every uid can reach (pytest's own folders are private to root).
    """
    top = Path(tempfile.mkdtemp(prefix="junjo-dbdata-"))
    top.chmod(0o755)
    folder = top / "dbdata" / "sqlite"
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)  # not ours to write, as a root-owned folder is to uid 10001
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


def _run_as_other(cwd: Path, database: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    user = "nobody" if os.geteuid() == 0 else None
    # Coverage does not follow: the other uid cannot write its data file beside ours.
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in _SETTING_NAMES and not k.startswith(("COV_", "COVERAGE_"))
    }
    return subprocess.run(
        [*as_user(user), sys.executable, "-m", "junjo_backend", *argv],
        env={**base, **_QUIET_PORTS, "DATABASE_URL": f"sqlite+aiosqlite:///{database}"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _their_uid() -> int:
    return pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()


@pytest.mark.parametrize("command", [("serve",), ("api-keys", "create", "app")])
def test_an_unwritable_folder_is_named_with_the_uid_and_the_fix(
    dbdata: Path, command: tuple[str, ...]
) -> None:
    result = _run_as_other(dbdata.parents[1], dbdata / "app_data.db", *command)
    uid = _their_uid()
    assert result.returncode == 1
    line = first_error_line(result)
    assert line.startswith(
        f"error: DATABASE_URL: the folder {dbdata} is not writable by uid {uid}, which this "
        "process runs as (owner uid "
    ), line
    assert f"`chown -R {uid} {dbdata}`" in line
    assert "--user " in line
    assert "unable to open" not in result.stderr
    assert not (dbdata / "app_data.db").exists()


def test_a_go_database_file_of_someone_else_is_named(dbdata: Path) -> None:
    """The Go backend's app_data.db, owned by root: the file is named, not the folder."""
    database = dbdata / "app_data.db"
    dbdata.chmod(0o755)
    sqlite3.connect(database).close()
    database.chmod(0o444)
    if os.geteuid() != 0:
        dbdata.chmod(0o555)
    result = _run_as_other(dbdata.parents[1], database, "serve")
    assert result.returncode == 1
    assert first_error_line(result).startswith(
        f"error: DATABASE_URL: the database file {database} is not writable by uid {_their_uid()}"
    )
