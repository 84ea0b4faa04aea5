"""Another process holds the SQLite file's exclusive lock: auth and `/health` keep their timeouts.

Issue 20: during a 15 s `BEGIN EXCLUSIVE` held by another process, ValidateApiKey answered
INTERNAL after 4.6-4.7 s or ran into the ingestion-service's 5 s deadline (the 2 s key-read
timeout did not hold), and `/health` (1 s probe) once took over 10 s. A query waiting on
SQLite's lock runs in aiosqlite's thread and cannot be cancelled; the caller must not wait
for it. The real server, the real `sqlite3` shell holding the lock, real calls.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest

from junjo_backend._wire.ingestion import auth_pb2
from junjo_backend.auth.known_keys import DEFAULT_READ_TIMEOUT_SECONDS
from tests.app.database_replacement import AuthCalls, Cli, backend_env
from tests.serve_process import ServeProcess

from .auth_calls import auth_stub

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .auth_calls import KeyRegistry

pytestmark = pytest.mark.timeout(180)

MAX_AGE = 0.5
HEALTH_PROBE_TIMEOUT = 1.0
# The busy timeout of the server's connections (database.py): how long SQLite itself waits.
BUSY_TIMEOUT = 10.0
# Longer than the busy timeout: the reads abandoned first fail inside SQLite while the lock
# is still held, and later ones queue behind them.
LOCK_SECONDS = 12.0
# The ingestion-service's deadline on each ValidateApiKey call.
GO_DEADLINE = 5.0
UNKNOWN = "k" * 64


@pytest.fixture
def exclusive_lock(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """`sqlite3` in a subprocess, started but not yet locking (see `_lock`)."""
    shell = subprocess.Popen(
        ["sqlite3", str(tmp_path / "data" / "junjo.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield shell
    finally:
        shell.kill()
        shell.wait()
        for stream in (shell.stdin, shell.stdout):
            if stream is not None:
                stream.close()


def _send(shell: subprocess.Popen[str], commands: str) -> None:
    assert shell.stdin is not None
    shell.stdin.write(commands)
    shell.stdin.flush()


def _lock(shell: subprocess.Popen[str]) -> None:
    """Take the exclusive lock; returns once the shell says it holds it."""
    assert shell.stdout is not None
    _send(shell, "BEGIN EXCLUSIVE;\n.print locked\n")
    assert shell.stdout.readline() == "locked\n"


async def test_auth_and_health_answer_within_their_timeouts_while_another_process_locks(
    tmp_path: Path, used_keys: KeyRegistry, exclusive_lock: subprocess.Popen[str]
) -> None:
    database = tmp_path / "data" / "junjo.db"
    env = backend_env(
        database,
        POLLER_ENABLED="false",
        API_KEY_CACHE_MAX_AGE_SECONDS=str(MAX_AGE),
        HEALTH_PROBE_TIMEOUT_SECONDS=str(HEALTH_PROBE_TIMEOUT),
    )
    cli = Cli(env, tmp_path, lambda name: tmp_path / f"cli-{name}.log")
    serve = ServeProcess(env, cwd=tmp_path, output=tmp_path / "serve.log")
    auth_answers: list[tuple[str, float]] = []
    health_answers: list[tuple[int, bool, float]] = []
    try:
        await serve.start().wait_ready()
        key = (await cli.create("app")).key
        used_keys.add(key)
        async with (
            grpc.aio.insecure_channel(serve.auth_address) as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{serve.http_port}") as http,
        ):
            calls = AuthCalls(channel)
            await calls.until(key, "true")
            stub = auth_stub(channel)

            async def validate(api_key: str) -> None:
                started = time.monotonic()
                try:
                    response = await stub.ValidateApiKey(
                        auth_pb2.ValidateApiKeyRequest(api_key=api_key), timeout=GO_DEADLINE
                    )
                except grpc.aio.AioRpcError as error:
                    answer = error.code().name
                else:
                    answer = str(response.is_valid).lower()
                auth_answers.append((answer, time.monotonic() - started))

            _lock(exclusive_lock)
            locked_at = time.monotonic()
            while time.monotonic() - locked_at < LOCK_SECONDS:
                await asyncio.sleep(MAX_AGE)  # the snapshot is stale: every call needs a read
                await validate(key)
                await validate(UNKNOWN)
                started = time.monotonic()
                health = await http.get("/health", timeout=30)
                health_answers.append(
                    (
                        health.status_code,
                        health.json()["database"]["ok"],
                        time.monotonic() - started,
                    )
                )
            _send(exclusive_lock, "COMMIT;\n.quit\n")
            exclusive_lock.wait(timeout=30)
            # Readable again: the key validates, the unknown one is refused, /health is ok.
            await calls.until(key, "true")
            assert await calls.answer(UNKNOWN) == "false"
            assert (await http.get("/health", timeout=30)).status_code == 200
    finally:
        await serve.stop_async()

    # Fail closed and in time: INTERNAL (never true, never the caller's deadline) ...
    assert {answer for answer, _ in auth_answers} == {"INTERNAL"}
    # ... given up at the read timeout, well before SQLite's own busy timeout ends the wait.
    read_bound = DEFAULT_READ_TIMEOUT_SECONDS + (BUSY_TIMEOUT - DEFAULT_READ_TIMEOUT_SECONDS) / 2
    assert max(seconds for _, seconds in auth_answers) < read_bound
    assert {(status, ok) for status, ok, _ in health_answers} == {(503, False)}
    health_bound = HEALTH_PROBE_TIMEOUT + (BUSY_TIMEOUT - HEALTH_PROBE_TIMEOUT) / 2
    assert max(seconds for *_, seconds in health_answers) < health_bound
    assert len(auth_answers) >= 4  # the lock outlasted SQLite's busy timeout, not one call
