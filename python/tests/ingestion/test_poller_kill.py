"""SIGKILL the poller's process mid-drain, start it again: every key arrives, in order, no gap."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harness.waiting import wait_until
from junjo_backend.database import close_engine, create_engine
from junjo_backend.poller.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from .fake_ingestion import FakeIngestionServer, FakeWal

RUNNER = Path(__file__).with_name("poller_runner.py")


def runs_in(keys_file: Path) -> list[list[bytes]]:
    """The keys each process wrote, one list per START marker."""
    runs: list[list[bytes]] = []
    text = keys_file.read_text(encoding="ascii")
    complete = text[: text.rfind("\n") + 1]  # a write may be under way
    for line in complete.splitlines():
        if line == "START":
            runs.append([])
        else:
            runs[-1].append(bytes.fromhex(line))
    return runs


def key_lines(keys_file: Path) -> int:
    if not keys_file.exists():
        return 0
    return sum(1 for line in keys_file.read_text(encoding="ascii").splitlines() if line != "START")


async def checkpoint(database_url: str) -> bytes | None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await load_checkpoint(conn)
    finally:
        await close_engine(engine)


async def test_sigkill_mid_drain_then_restart_delivers_every_key_in_order(
    ingestion_server: FakeIngestionServer, wal: FakeWal, database_url: str, tmp_path: Path
) -> None:
    keys = wal.seed(20_000)
    keys_file = tmp_path / "keys.txt"
    command = [sys.executable, str(RUNNER), ingestion_server.address, database_url, str(keys_file)]

    first = await asyncio.create_subprocess_exec(*command)
    try:
        await wait_until(lambda: key_lines(keys_file) >= 3000, limit=120)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    killed_at = key_lines(keys_file)
    assert killed_at < len(keys), "the first run finished before it could be killed"

    second = await asyncio.create_subprocess_exec(*command)
    try:
        await wait_until(lambda: runs_in(keys_file)[-1][-1:] == keys[-1:], limit=120)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await second.wait() == 0

    first_run, second_run = runs_in(keys_file)
    # Each run delivers a contiguous stretch of the WAL in key order, the first from the
    # start, the second from just after the last committed checkpoint, to the end.
    assert first_run == keys[: len(first_run)]
    resumed_at = keys.index(second_run[0])
    assert second_run == keys[resumed_at:]
    assert resumed_at <= len(first_run)  # no gap; a few keys may come twice
    assert set(first_run) | set(second_run) == set(keys)
    assert await checkpoint(database_url) == keys[-1]
