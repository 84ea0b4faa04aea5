"""What the app tests run and probe: `serve` in a subprocess, and checks that a released
resource is really released. The ingestion side is tests/ingestion/fake_ingestion.py."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
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


class ServeProcess:
    """`junjo-backend serve` in a subprocess with JSON logs, read line by line."""

    def __init__(
        self,
        env: dict[str, str],
        cwd: Path,
        command: tuple[str, ...] = (sys.executable, "-m", "junjo_backend.cli.main"),
        base_env: dict[str, str] | None = None,
    ) -> None:
        """`COMMAND serve` in `cwd`, its environment `base_env` (ours by default) plus `env`."""
        self.records: list[dict[str, object]] = []
        self.lines: list[str] = []
        self._new: queue.Queue[dict[str, object] | None] = queue.Queue()
        self.process = subprocess.Popen(
            [*command, "serve"],
            env={**(os.environ if base_env is None else base_env), **env, "LOG_FORMAT": "json"},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr as stream:
            for line in stream:
                self.lines.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    self.records.append(record)
                    self._new.put(record)
        self._new.put(None)

    def wait_for(self, message: str, timeout: float = 30.0, **fields: object) -> dict[str, object]:
        """The first record whose message starts with `message` and that carries `fields`."""

        def matches(record: dict[str, object]) -> bool:
            return str(record.get("msg", "")).startswith(message) and all(
                record.get(name) == value for name, value in fields.items()
            )

        for record in list(self.records):
            if matches(record):
                return record
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                arrived = self._new.get(timeout=left)
            except queue.Empty:
                break
            if arrived is None:  # the process has ended
                break
            if matches(arrived):
                return arrived
        output = "".join(self.lines)
        msg = f"no log record {message!r} {fields}; the process wrote:\n{output}"
        raise AssertionError(msg)

    def messages(self) -> list[str]:
        """Every record's message, in order."""
        return [str(record.get("msg")) for record in self.records]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send `signum` to the server."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status, once the process has ended and its output has been read."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code

    def kill(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join()
