"""Slow-loris on the HTTP API: connections that trickle a request head, or send nothing.

uvicorn alone kept all of them open indefinitely. The backend gives each connection
HTTP_HEADER_TIMEOUT_SECONDS to deliver a complete request head and closes connections
beyond HTTP_MAX_CONNECTIONS as soon as they are accepted (junjo_backend/http_protocol.py).
Here the timeout is short to keep the scenario brief; the row says how many of the
attacking connections the server closed and after how long, and that /ping answered
during the attack.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from typing import TYPE_CHECKING

from .net_helpers import percentile, running_backend

if TYPE_CHECKING:
    from .conftest import FaultKit

EACH = 250  # trickling connections, and as many idle ones
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 2 * EACH + 50
OVER_CAP = 100  # connections opened past the cap in the second phase
HANG_GUARD = 30.0  # seconds; the server closes them at HEADER_TIMEOUT


def _ping(port: int) -> bytes:
    url = f"http://127.0.0.1:{port}/ping"
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


def _closed_by_peer(conn: socket.socket) -> bool:
    try:
        return conn.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _attack(port: int) -> tuple[dict[int, float], int, bool]:
    """Open the idle and trickling connections and keep trickling until the server closes
    them: when each closed (by index; the trickling ones come second), the bytes each
    trickler sent, and whether /ping answered while all of them were open."""
    head = b"GET /ping HTTP/1.1\r\nHost: backend\r\n" + b"X-Padding: slow\r\n" * 2000
    opened = time.monotonic()
    attackers = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * EACH)]
    closed_after: dict[int, float] = {}
    pinged_during = False
    sent = 0
    try:
        for conn in attackers:
            conn.settimeout(0)
        while len(closed_after) < len(attackers) and time.monotonic() - opened < HANG_GUARD:
            for index, conn in enumerate(attackers):
                if index in closed_after:
                    continue
                trickled = index < EACH or _send_quietly(conn, head[sent : sent + 1])
                if not trickled or _closed_by_peer(conn):
                    closed_after[index] = time.monotonic() - opened
            sent += 1  # one byte per round and connection: a trickle
            if not pinged_during and not closed_after:
                pinged_during = _ping(port) == b"pong"
            time.sleep(0.1)
    finally:
        for conn in attackers:
            conn.close()
    return closed_after, sent, pinged_during


def _send_quietly(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.send(data)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True


def _refused_over_cap(port: int) -> int:
    """Fill the cap, open OVER_CAP more: how many of those the server closed at once."""
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    over_cap = [socket.create_connection(("127.0.0.1", port)) for _ in range(OVER_CAP)]
    try:
        for conn in over_cap:
            conn.settimeout(0)
        # Well within the header timeout: a connection the server took is still open here.
        time.sleep(min(0.5, HEADER_TIMEOUT / 4))
        return sum(1 for conn in over_cap if _closed_by_peer(conn))
    finally:
        for conn in extra + over_cap:
            conn.close()


def test_trickling_and_idle_connections_are_closed(
    kit: FaultKit,
) -> None:
    """Every attacking connection is closed by the server; /ping answers meanwhile."""
    asyncio.run(kit.store_keys(kit.sqlite_url(), 1))
    with running_backend(
        kit,
        "serve-slowloris",
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as backend:
        closed_after, sent, pinged_during = _attack(backend.http_port)
        refused = _refused_over_cap(backend.http_port)
        pinged_after = _ping(backend.http_port) == b"pong"
        assert backend.alive()

    closed_idle = sum(1 for index in closed_after if index < EACH)
    closed_trickling = len(closed_after) - closed_idle
    times = list(closed_after.values())
    assert closed_idle == EACH, f"idle connections still open: {EACH - closed_idle}"
    assert closed_trickling == EACH, f"trickling connections still open: {EACH - closed_trickling}"
    assert pinged_during, "/ping did not answer while the attack was under way"
    assert pinged_after
    assert refused == OVER_CAP, f"only {refused} of {OVER_CAP} connections over the cap closed"
    kit.table.add(
        "HTTP slow-loris: trickling + idle connections (header timeout "
        f"{HEADER_TIMEOUT:g} s, cap {MAX_CONNECTIONS})",
        f"{EACH} + {EACH}, then {OVER_CAP} over the cap",
        f"closed by the server: {closed_idle}/{EACH} idle, {closed_trickling}/{EACH} trickling"
        f" (up to {sent} bytes sent each), after {min(times):.1f}-{max(times):.1f} s"
        f" (median {percentile(times, 0.5):.1f}); {refused}/{OVER_CAP} over the cap closed"
        " at once; /ping answered during and after",
    )
