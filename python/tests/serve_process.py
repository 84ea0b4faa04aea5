"""`python -m junjo_backend serve` in a subprocess: the one way tests run the real server.

A `ServeProcess` starts the command with the test's settings as environment variables on
top of `BASE_ENV` (loopback, ephemeral ports, nothing dialled by accident), writes its
stdout and stderr to a file (a fresh one per run when given a function that names files),
waits for its ready line and reads the ports it listens on from it, and stops it with
SIGTERM, then SIGKILL after a hang guard. A test may kill it and start it again: each run is
numbered (`runs`), and `per_run` adds environment for a run from its number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Self

from harness.waiting import NeverHappenedError, wait_until, wait_until_sync

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

SERVE = (sys.executable, "-m", "junjo_backend", "serve")
READY = "junjo-backend ready"
# The ready line names both ports, in text (`auth_grpc=127.0.0.1:PORT`) and JSON
# (`"auth_grpc": "127.0.0.1:PORT"`) logs alike.
_AUTH_ADDRESS = re.compile(r'auth_grpc"?[=:]\s*"?([0-9.]+:\d+)')
_HTTP_PORT = re.compile(r'http_port"?[=:]\s*"?(\d+)')
# Hang guards, not timings.
READY_WITHIN = 60.0
STOP_WITHIN = 60.0

# What every test's server starts from; the test's own env goes on top.
BASE_ENV = {
    "AUTH_GRPC_LISTEN_ADDRESS": "127.0.0.1:0",
    "HTTP_HOST": "127.0.0.1",
    "HTTP_PORT": "0",
    "INGESTION_GRPC_ADDRESS": "127.0.0.1:1",  # nothing listens there
    "GRPC_SHUTDOWN_GRACE_SECONDS": "1",
}


class ServeProcess:
    """One server process at a time, started, killed, restarted and stopped by the test."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        cwd: Path,
        output: Path | Callable[[str], Path],
        command: Sequence[str] = SERVE,
        name: str = "serve",
        per_run: Callable[[int], Mapping[str, str]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`environ` is the environment the settings go on top of: this process's by default."""
        self._environ = dict(os.environ if environ is None else environ)
        self._env = {**BASE_ENV, **env}
        self._cwd = cwd
        self._output = output
        self._command = list(command)
        self.name = name
        self._per_run = per_run
        self._process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.output_files: list[Path] = []
        self.auth_address = ""
        self.http_port = 0
        self._run_file: Path | None = None
        self._run_offset = 0

    # --- running -----------------------------------------------------------------------

    def start(self) -> Self:
        """Start the next run, its output to its file; returns at once (see `wait_ready`)."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running")
        self.runs += 1
        path = self._output if isinstance(self._output, Path) else self._output(self.name)
        if path not in self.output_files:
            self.output_files.append(path)
        extra = self._per_run(self.runs) if self._per_run is not None else {}
        # With one file for every run, this run's lines start where the last run's ended.
        self._run_file, self._run_offset = path, path.stat().st_size if path.exists() else 0
        with path.open("ab") as out:
            self._process = subprocess.Popen(
                self._command,
                env={**self._environ, **self._env, **extra},
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The current run (RuntimeError when none is running)."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process

    @property
    def running(self) -> bool:
        """Whether a run was started and not yet stopped, killed or reaped by the test."""
        return self._process is not None

    def alive(self) -> bool:
        """Whether the current run's process has not exited."""
        return self._process is not None and self._process.poll() is None

    def _ready_line(self) -> str | None:
        """This run's ready line; AssertionError (with the output) if the run has ended."""
        for line in self.run_text().splitlines():
            if READY in line:
                return line
        if self._process is None or self._process.poll() is not None:
            raise AssertionError(f"{self.name} exited before it was ready:\n{self.text()[-4000:]}")
        return None

    def _is_ready(self) -> bool:
        return self._ready_line() is not None

    async def wait_ready(self, limit: float = READY_WITHIN) -> Self:
        """Return once this run logged its ready line; its ports are then set."""
        try:
            await wait_until(self._is_ready, f"{self.name} ready", limit=limit, every=0.02)
        except NeverHappenedError:
            raise AssertionError(f"{self.name} never got ready:\n{self.text()[-4000:]}") from None
        return self._ready()

    def wait_ready_sync(self, limit: float = READY_WITHIN) -> Self:
        """`wait_ready` for tests without an event loop."""
        try:
            wait_until_sync(self._is_ready, f"{self.name} ready", limit=limit, every=0.02)
        except NeverHappenedError:
            raise AssertionError(f"{self.name} never got ready:\n{self.text()[-4000:]}") from None
        return self._ready()

    def _ready(self) -> Self:
        line = self._ready_line()
        assert line is not None
        auth, http = _AUTH_ADDRESS.search(line), _HTTP_PORT.search(line)
        assert auth is not None, line
        assert http is not None, line
        self.auth_address, self.http_port = auth.group(1), int(http.group(1))
        return self

    @property
    def auth_port(self) -> int:
        """The auth server's port (once ready)."""
        return int(self.auth_address.rsplit(":", 1)[1])

    @property
    def http_url(self) -> str:
        """Where the HTTP API answers (once ready)."""
        return f"http://127.0.0.1:{self.http_port}"

    # --- stopping ----------------------------------------------------------------------

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send `signum` to the current run without waiting for it (SIGSTOP, SIGCONT, ...)."""
        self.process.send_signal(signum)

    def wait(self, limit: float = STOP_WITHIN) -> int:
        """The current run's exit status once it has ended by itself or by a signal sent."""
        code = self.process.wait(timeout=limit)
        self._reaped()
        return code

    def kill(self) -> None:
        """SIGKILL the current run and reap it."""
        process = self.process
        process.kill()
        process.wait()
        self._reaped()

    def stop(self, limit: float = STOP_WITHIN) -> int | None:
        """SIGTERM, then SIGKILL after `limit`; the exit status (None if nothing was running)."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        self._reaped()
        return code

    async def stop_async(self, limit: float = STOP_WITHIN) -> int | None:
        """`stop` off the event loop (the server may be talking to servers on this loop)."""
        return await asyncio.to_thread(self.stop, limit)

    def close(self) -> None:
        """Make sure no run is left (teardown; idempotent)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.wait()
            self._reaped()

    def _reaped(self) -> None:
        self._process = None

    # --- output ------------------------------------------------------------------------

    def text(self) -> str:
        """What every run wrote so far."""
        return "\n".join(path.read_text(errors="replace") for path in self.output_files)

    def run_text(self) -> str:
        """What the current (or last) run wrote so far."""
        if self._run_file is None:
            return ""
        return self._run_file.read_bytes()[self._run_offset :].decode(errors="replace")

    def lines(self) -> list[str]:
        """The current (or last) run's output, line by line."""
        return self.run_text().splitlines()

    def records(self) -> list[dict[str, object]]:
        """The current run's JSON log records (LOG_FORMAT=json), in order."""
        records: list[dict[str, object]] = []
        for line in self.lines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def messages(self) -> list[str]:
        """Every JSON record's message, in order."""
        return [str(record.get("msg")) for record in self.records()]

    def wait_for(self, message: str, limit: float = 30.0, **fields: object) -> dict[str, object]:
        """The first JSON record whose message starts with `message` and that has `fields`."""

        def matching() -> dict[str, object] | None:
            for record in self.records():
                if str(record.get("msg", "")).startswith(message) and all(
                    record.get(name) == value for name, value in fields.items()
                ):
                    return record
            return None

        def found_or_gone() -> bool:
            return matching() is not None or not self.alive()

        with contextlib.suppress(NeverHappenedError):
            wait_until_sync(found_or_gone, f"log record {message!r}", limit=limit, every=0.02)
        record = matching()
        if record is None:
            msg = f"no log record {message!r} {fields}; the process wrote:\n{self.run_text()}"
            raise AssertionError(msg)
        return record

    def count_in_output(self, text: str) -> int:
        """How many times `text` occurs in the output of every run."""
        return self.text().count(text)

    def rss_kib(self) -> int:
        """The current run's resident set size, in KiB (from /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line: the server has exited")
