"""Idle TCP connections and HTTP/2 connections stalled after the preface, on the auth port.

500 connections that never send a byte and 500 that send the HTTP/2 client preface and a
SETTINGS frame, then nothing (no SETTINGS ack, no stream). Valid ValidateApiKey calls from
grpc-go (authload, as the ingestion-service calls) are measured before and while they are
open; the row reports both p99s and how many of the stalled connections the server closed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from .net_helpers import authload, running_backend

if TYPE_CHECKING:
    from .conftest import FaultKit

EACH = 500
SECONDS = 3
CALLERS = 4
# The HTTP/2 client connection preface, then an empty SETTINGS frame (RFC 9113, 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
# p99 with the connections open / p99 before. The target is 2 (the bar, reported in
# the row); the assertion only catches a collapse, since the CPU is shared.
P99_RATIO_GUARD = 10.0


def _closed_by_peer(conn: socket.socket) -> bool:
    try:
        while chunk := conn.recv(65536):  # the server's SETTINGS, then EOF if it hangs up
            del chunk
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def test_valid_calls_keep_their_latency_beside_stalled_connections(
    kit: FaultKit,
) -> None:
    """Valid calls succeed, with a p99 near the baseline, while 1,000 connections stall."""
    keys = asyncio.run(kit.store_keys(kit.sqlite_url(), 4))
    keys_file = kit.folder / "keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    load_errors = kit.output.path("authload-stalled")
    with running_backend(kit, "serve-stalled") as backend:
        host, port = backend.auth_address.rsplit(":", 1)
        baseline = authload(
            backend.auth_address, keys_file, load_errors, SECONDS, concurrency=CALLERS
        )
        idle = [socket.create_connection((host, int(port))) for _ in range(EACH)]
        stalled = [socket.create_connection((host, int(port))) for _ in range(EACH)]
        try:
            for conn in stalled:
                conn.sendall(PREFACE)
            opened = time.monotonic()
            loaded = authload(
                backend.auth_address, keys_file, load_errors, SECONDS, concurrency=CALLERS
            )
            held_for = time.monotonic() - opened
            for conn in idle + stalled:
                conn.settimeout(0)
            closed_idle = sum(1 for conn in idle if _closed_by_peer(conn))
            closed_stalled = sum(1 for conn in stalled if _closed_by_peer(conn))
        finally:
            for conn in idle + stalled:
                conn.close()
        after = authload(backend.auth_address, keys_file, load_errors, 1, concurrency=CALLERS)
        assert backend.alive()

    for report in (baseline, loaded, after):
        assert report["wrong_answers"] == 0, report
        assert report["errors"] == 0, report
    ratio = loaded["p99_ms"] / max(baseline["p99_ms"], 0.001)
    assert ratio < P99_RATIO_GUARD, f"p99 {baseline['p99_ms']} ms -> {loaded['p99_ms']} ms"
    kit.table.add(
        f"{EACH} idle TCP + {EACH} HTTP/2 stalled after the preface, auth port",
        f"{loaded['calls']:,} valid calls beside them",
        f"valid p99 {baseline['p99_ms']} ms before, {loaded['p99_ms']} ms with them open"
        f" ({ratio:.2f}x, target <= 2x); {baseline['rps']:,.0f} -> {loaded['rps']:,.0f} calls/s;"
        f" 0 errors, 0 wrong answers; server closed {closed_idle} idle and {closed_stalled}"
        f" stalled within {held_for:.0f} s",
    )
