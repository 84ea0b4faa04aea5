"""What the app tests probe: checks that a released resource is really released, and faults
made to the SQLite file. `serve` runs through tests/serve_process.py; the ingestion side is
tests/ingestion/fake_ingestion.py."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def open_files_under(folder: Path) -> list[str]:
    """Paths under `folder` that this process still holds open (SQLite files included)."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # the fd closed while we looked
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


def corrupt_sqlite_file(path: Path) -> None:
    """Replace the SQLite file (a new file at the path) with bytes that are not a database.

    A rollback journal left behind would be rolled back into the garbage, so it goes too.
    """
    for suffix in ("", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 100)


def drop_table(path: Path, table: str) -> None:
    """Drop `table` from the SQLite file at `path`, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"DROP TABLE {table}")


def established_connections_to(port: int) -> int:
    """Established TCP connections from this process's host to 127.0.0.1:`port` (client side)."""
    count = 0
    # gRPC's sockets are often IPv6 ones carrying IPv4-mapped addresses: read both tables.
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01":  # 01 = ESTABLISHED
                count += 1
    return count
