"""A SQLite file replaced under a running `serve`: the scenario of the faults issue, defect 1.

The real server runs as a subprocess (tests/serve_process.py), keys are made and revoked
by the real CLI in subprocesses, and every answer comes from real ValidateApiKey calls.
Two ways to replace the file, as an operator restores a backup: delete it and copy the
backup in (a new file at the path), or overwrite it in place (garbage over its header
first, then the backup's bytes, the same file). Used by tests/app/test_database_replaced.py
and by the fault suite (tests/faults/test_database_replaced.py), which records the figures
measured here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import grpc
import httpx

from harness.waiting import NeverHappenedError, wait_until
from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from tests.serve_process import ServeProcess

Style = Literal["delete and copy", "in place"]
Answer = Literal["true", "false", "INTERNAL", "other"]

# Hang guards, not timings: each wait ends far sooner when the server is right.
_READY_WITHIN = 60.0
_CHANGE_WITHIN = 20.0
_POLL_SECONDS = 0.02
_CREATED_KEY = re.compile(r"^\s*([0-9A-Za-z]{64})\s*$", re.MULTILINE)
_CREATED_ID = re.compile(r"\(id ([^)]+)\)")


def backend_env(database: Path, **extra: str) -> dict[str, str]:
    """The settings of a `serve` or CLI run on `database` (ServeProcess adds loopback ports)."""
    return {"DATABASE_URL": f"sqlite+aiosqlite:///{database}", **extra}


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key the CLI created: its id, and the key itself (test material, never logged)."""

    id: str
    key: str


class Cli:
    """The real `junjo-backend` CLI in subprocesses; each call's output goes to a new file."""

    def __init__(self, env: dict[str, str], cwd: Path, output: Callable[[str], Path]) -> None:
        self._env = env
        self._cwd = cwd
        self._output = output
        self.calls = 0

    async def run(self, *args: str) -> tuple[int, str]:
        """Exit status, and stdout then stderr, of `junjo-backend ARGS` (also in a file)."""
        self.calls += 1
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "junjo_backend.cli.main",
            *args,
            env={**os.environ, **self._env},
            cwd=self._cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), _READY_WITHIN)
        stdout = out.decode()
        # `create` shows its new key once, on stdout, by design: that line alone is left
        # out of the file; everything else the command wrote (its logs too) is kept.
        shown = _CREATED_KEY.findall(stdout) if args[:2] == ("api-keys", "create") else []
        assert len(shown) <= 1
        kept = _CREATED_KEY.sub("    <the new key, shown once>", stdout) if shown else stdout
        self._output(f"cli-{args[0]}-{args[1]}").write_text(kept + err.decode())
        assert process.returncode is not None
        return process.returncode, stdout + err.decode()

    async def create(self, name: str) -> CreatedKey:
        """A new key through `api-keys create`."""
        code, out = await self.run("api-keys", "create", name)
        key, key_id = _CREATED_KEY.search(out), _CREATED_ID.search(out)
        assert code == 0
        assert key is not None
        assert key_id is not None
        return CreatedKey(id=key_id.group(1), key=key.group(1))


@dataclass(slots=True)
class Tally:
    """ValidateApiKey answers, counted by outcome."""

    answers: dict[str, int] = field(default_factory=dict)

    def add(self, answer: Answer) -> None:
        """Count one answer."""
        self.answers[answer] = self.answers.get(answer, 0) + 1

    @property
    def calls(self) -> int:
        """Calls made."""
        return sum(self.answers.values())


class AuthCalls:
    """ValidateApiKey through a real channel, every answer counted."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = auth_pb2_grpc.InternalAuthServiceStub(channel)
        self.tally = Tally()

    async def answer(self, key: str) -> Answer:
        """One call with the ingestion-service's 5 s deadline: true, false, INTERNAL or other."""
        request = auth_pb2.ValidateApiKeyRequest(api_key=key)
        try:
            response = await self._stub.ValidateApiKey(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            answer: Answer = "INTERNAL" if error.code() is grpc.StatusCode.INTERNAL else "other"
        else:
            answer = "true" if response.is_valid else "false"
        self.tally.add(answer)
        return answer

    async def until(self, key: str, wanted: Answer) -> tuple[float, list[Answer]]:
        """Call until the answer is `wanted`: seconds taken, and the answers before it."""
        answers: list[Answer] = []

        async def answered() -> bool:
            answers.append(await self.answer(key))
            return answers[-1] == wanted

        try:
            seconds = await wait_until(
                answered, f"answer {wanted}", limit=_CHANGE_WITHIN, every=_POLL_SECONDS
            )
        except NeverHappenedError:
            msg = f"never answered {wanted} within the hang guard; answers: {answers[-5:]}"
            raise AssertionError(msg) from None
        return seconds, answers[:-1]


@dataclass(slots=True)
class ReplacementOutcome:
    """What one replacement did, as measured through the real server."""

    style: Style
    health_while_broken: int = 0
    database_error_while_broken: str | None = None
    created_a_file_while_missing: bool = False
    true_after_break_detected: int = 0
    revoked_refused_after: float = 0.0
    revoked_answers_before_refusal: list[Answer] = field(default_factory=list)
    revoked_answers_after_refusal: list[Answer] = field(default_factory=list)
    new_key_valid_after: float = 0.0
    calls: int = 0
    cli_calls: int = 0


def _overwrite_in_place(path: Path, content: bytes) -> None:
    """Write `content` over the file at `path` without replacing it (same inode)."""
    with path.open("r+b") as file:
        file.write(content)
        file.truncate()
        file.flush()
        os.fsync(file.fileno())


def _take_backup(database: Path) -> Path:
    """A copy of the database file beside it (rollback journal: the file is the database)."""
    backup = database.with_name("backup.db")
    shutil.copyfile(database, backup)
    return backup


def _break(database: Path, style: Style) -> None:
    """The first half of a restore: the file deleted, or garbage over its header."""
    if style == "delete and copy":
        for leftover in database.parent.glob(database.name + "*"):
            leftover.unlink()
    else:
        _overwrite_in_place(database, b"not a database, " * 7)


def _restore(database: Path, backup: Path, style: Style) -> None:
    """The second half: the backup copied in as a new file, or written over the same one."""
    if style == "delete and copy":
        shutil.copyfile(backup, database)
        return
    inode = database.stat().st_ino
    _overwrite_in_place(database, backup.read_bytes())
    assert database.stat().st_ino == inode


async def replace_database(
    *,
    style: Style,
    database: Path,
    serve: ServeProcess,
    cli: Cli,
    auth: AuthCalls,
    register: Callable[[str], None],
    max_age: float,
    while_broken: Callable[[], Awaitable[None]] | None = None,
) -> ReplacementOutcome:
    """Create K1, restore a backup holding K1 over the database, revoke K1, create K2.

    `while_broken` runs once the server has seen the break, before the restore.
    """
    outcome = ReplacementOutcome(style=style)
    first = await cli.create("before the restore")
    register(first.key)
    await auth.until(first.key, "true")
    backup = _take_backup(database)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{serve.http_port}") as http:
        _break(database, style)
        # The break is seen within the max age plus a read: INTERNAL, never a stale true.
        await auth.until(first.key, "INTERNAL")
        for _ in range(10):
            if await auth.answer(first.key) == "true":
                outcome.true_after_break_detected += 1
        health = await http.get("/health", timeout=10)
        outcome.health_while_broken = health.status_code
        outcome.database_error_while_broken = health.json()["database"]["error"]
        if while_broken is not None:
            await while_broken()
        outcome.created_a_file_while_missing = style == "delete and copy" and database.exists()  # noqa: ASYNC240 (one stat)
        _restore(database, backup, style)

    code, _ = await cli.run("api-keys", "revoke", first.id)
    assert code == 0
    revoked_at = time.monotonic()
    _, outcome.revoked_answers_before_refusal = await auth.until(first.key, "false")
    outcome.revoked_refused_after = time.monotonic() - revoked_at
    # Refused for good: over twice the max age, every answer is still false.
    settle = time.monotonic() + 2 * max_age
    while time.monotonic() < settle:
        outcome.revoked_answers_after_refusal.append(await auth.answer(first.key))
        await asyncio.sleep(_POLL_SECONDS)

    second = await cli.create("after the restore")
    register(second.key)
    created_at = time.monotonic()
    await auth.until(second.key, "true")
    outcome.new_key_valid_after = time.monotonic() - created_at
    outcome.calls = auth.tally.calls
    outcome.cli_calls = cli.calls
    return outcome
