"""`junjo-backend serve` as a real process: start-up banner, signals, exit status, ports."""

from __future__ import annotations

import signal
import socket
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import pytest

from harness.waiting import port_is_free
from tests.serve_process import ServeProcess

if TYPE_CHECKING:
    from pathlib import Path

    from tests.ingestion.fake_ingestion import FakeIngestionServer

pytestmark = pytest.mark.timeout(120)

Start = Callable[[dict[str, str]], ServeProcess]

SHUTDOWN_STEPS = ["span poller", "ingestion client", "auth server", "database"]


def stopped_steps(process: ServeProcess) -> list[str]:
    return [str(r["step"]) for r in process.records() if r.get("msg") == "stopped"]


def ready_ports(process: ServeProcess) -> tuple[int, int]:
    """The HTTP and auth ports the server logged when it was ready."""
    ready = process.wait_for("junjo-backend ready")
    assert "api-keys create NAME" in str(ready["msg"])
    http_port = ready["http_port"]
    auth = str(ready["auth_grpc"])
    assert isinstance(http_port, int)
    return http_port, int(auth.rsplit(":", 1)[1])


def test_sigterm_shuts_down_gracefully_in_reverse_order(
    serve_process: Start, ingestion: FakeIngestionServer
) -> None:
    process = serve_process({"INGESTION_GRPC_ADDRESS": ingestion.address})
    http_port, auth_port = ready_ports(process)

    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
        assert http.get("/ping").text == "pong"
        health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["auth_server"]["address"] == f"127.0.0.1:{auth_port}"

    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert stopped_steps(process) == SHUTDOWN_STEPS
    assert "shutting down gracefully; send the signal again to force exit" in process.messages()
    assert port_is_free(http_port)
    assert port_is_free(auth_port)


def test_sigint_shuts_down_gracefully_too(serve_process: Start) -> None:
    process = serve_process({"POLLER_ENABLED": "false"})
    ready_ports(process)

    process.signal(signal.SIGINT)

    assert process.wait() == 0
    # POLLER_ENABLED=false: no ingestion client was started, so none is stopped.
    assert stopped_steps(process) == ["auth server", "database"]


def test_a_second_signal_forces_exit(serve_process: Start, tmp_path: Path) -> None:
    process = serve_process({"POLLER_ENABLED": "false"})
    ready_ports(process)
    # A real way to make shutdown hang: another process holds the database's exclusive
    # lock, so the last shutdown step's PRAGMA optimize waits on its busy timeout.
    reader = sqlite3.connect(tmp_path / "data" / "junjo.db", isolation_level=None)
    try:
        reader.execute("BEGIN EXCLUSIVE")

        process.signal(signal.SIGTERM)
        # The auth server is the step before the database: its "stopped" means the
        # PRAGMA optimize is under way, and waiting on the lock.
        process.wait_for("stopped", step="auth server")
        process.signal(signal.SIGTERM)
        code = process.wait()
    finally:
        reader.close()

    assert code == 128 + signal.SIGTERM
    assert "second signal: exiting without finishing shutdown" in process.messages()
    assert "database" not in stopped_steps(process)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("AUTH_GRPC_LISTEN_ADDRESS", "127.0.0.1:{port}"), ("HTTP_PORT", "{port}")],
)
def test_a_taken_port_fails_before_anything_starts(
    serve_process: Start, setting: str, value: str
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        process = serve_process({setting: value.format(port=port)})
        code = process.wait()

    assert code == 1
    assert process.lines()[0].startswith("error: ")
    assert f"127.0.0.1:{port}: Address already in use" in process.lines()[0]
    assert setting in process.lines()[0]
    # Both ports are checked before the database opens: nothing started, nothing to stop.
    assert process.records() == []
