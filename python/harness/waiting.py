"""Loopback ports and polling waits, one helper of each for every test, script and benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago.

    All are held at once while they are picked, so the kernel cannot hand out one twice. The
    caller's server binds them later, in its own process: a small race a retry would cover
    (PostgreSQL, for one, cannot bind port 0 and report the port it got).
    """
    with contextlib.ExitStack() as held:
        socks = [
            held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """One loopback port that was free a moment ago."""
    return free_ports(1)[0]


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port`, binding it as a new server would.

    SO_REUSEADDR, as servers set it: connections of an earlier run in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class NeverHappenedError(AssertionError):
    """A wait gave up: the condition did not hold within its hang guard.

    An AssertionError, so a test fails with the message rather than erroring.
    """


async def wait_until(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]],
    what: str = "the condition",
    *,
    limit: float = 60.0,
    every: float = 0.01,
) -> float:
    """Poll `condition` (plain or async) until it holds; the seconds it took.

    `limit` is a hang guard, not a measurement: NeverHappenedError naming `what` after it.
    Polling, because the state often lives in other threads, processes or files.
    """
    started = time.monotonic()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise NeverHappenedError(f"not within {limit:g} s (a hang guard): {what}")
        await asyncio.sleep(every)


def wait_until_sync(
    condition: Callable[[], bool],
    what: str = "the condition",
    *,
    limit: float = 60.0,
    every: float = 0.1,
) -> float:
    """`wait_until` for code without an event loop (scripts, threads); the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise NeverHappenedError(f"not within {limit:g} s (a hang guard): {what}")
        time.sleep(every)
    return time.monotonic() - started
