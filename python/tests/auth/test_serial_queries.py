"""SerialQueries: a caller stops waiting at its timeout; abandoned work never piles up.

Work here is a coroutine blocked on an event, standing in for a query that waits for a
SQLite lock in aiosqlite's thread (tests/auth/test_locked_database.py holds a real lock).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from junjo_backend.database import SerialQueries

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


class Work:
    """Work that runs until released; counts how many pieces ran and ran at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.running = 0
        self.most_at_once = 0

    def piece(self, name: str) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.started.append(name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            try:
                await self.release.wait()
            finally:
                self.running -= 1
            return name

        return run


async def test_callers_give_up_at_their_timeout_and_abandoned_work_does_not_pile_up() -> None:
    queries = SerialQueries()
    work = Work()
    try:
        with pytest.raises(TimeoutError, match=r"no answer within 0\.05 s"):
            await queries.run(work.piece("first"), 0.05)
        # The first piece still runs (its query cannot be interrupted); the next ones wait
        # for it and, given up before their turn, never run.
        for name in ("second", "third"):
            with pytest.raises(TimeoutError):
                await queries.run(work.piece(name), 0.05)
        assert work.started == ["first"]
        assert work.running == 1

        work.release.set()
        assert await queries.run(work.piece("fourth"), 5.0) == "fourth"
        assert work.started == ["first", "fourth"]
        assert work.most_at_once == 1
    finally:
        await queries.close()


async def test_a_piece_that_fails_reports_its_error_to_its_caller() -> None:
    queries = SerialQueries()

    async def fails() -> None:
        raise OSError("disk I/O error")

    with pytest.raises(OSError, match="disk I/O error"):
        await queries.run(fails, 5.0)
    await queries.close()


async def test_close_cancels_work_under_way_and_later_work_still_runs() -> None:
    queries = SerialQueries()
    work = Work()
    with pytest.raises(TimeoutError):
        await queries.run(work.piece("stuck"), 0.05)
    await queries.close()
    assert work.running == 0
    work.release.set()
    assert await queries.run(work.piece("after"), 5.0) == "after"
