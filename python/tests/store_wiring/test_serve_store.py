"""`junjo-backend serve` against the real Go peer keeps every drained span in its DuckDB file,
and does not drain at all while another process holds that file."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest

from harness.peer import PEER_BINARY, Peer, PeerPorts
from harness.waiting import free_ports, wait_until
from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc
from tests.serve_process import ServeProcess

from .store_files import PATCHES_PER_TRACE, SPANS_PER_TRACE, junjo_traces, store_rows

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TRACES = 600  # 3,000 spans
RETRY_SECONDS = 0.3
# A hang guard: on a loaded machine `serve` can take many seconds to import and start.
STARTUP_LIMIT_SECONDS = 120.0


class Deployment:
    """`serve` (JSON logs) on fixed ports with the Go peer dialling its auth server."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        public, internal, auth, http = free_ports(4)
        self.auth_address = f"127.0.0.1:{auth}"
        self.http = f"http://127.0.0.1:{http}"
        self.peer = Peer(
            PeerPorts(public, internal, backend=auth), folder / "wal", log_level="info"
        )
        self.store = folder / "data" / "otel_data.db"
        self.database = folder / "data" / "junjo.db"
        self.env = {
            "DATABASE_URL": f"sqlite+aiosqlite:///{self.database}",
            "AUTH_GRPC_LISTEN_ADDRESS": self.auth_address,
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(http),
            "INGESTION_GRPC_ADDRESS": self.peer.internal_address,
            "GRPC_SHUTDOWN_GRACE_SECONDS": "1",
            "POLLER_IDLE_WAIT_SECONDS": "0.05",
            "POLLER_SETTLE_SECONDS": "0.05",
            "POLLER_LEADER_RETRY_SECONDS": str(RETRY_SECONDS),
            "LOG_LEVEL": "INFO",
        }
        self.backend: ServeProcess | None = None

    def start(self) -> ServeProcess:
        self.backend = ServeProcess(
            {**self.env, "LOG_FORMAT": "json"}, cwd=self.folder, output=self.folder / "serve.log"
        ).start()
        self.backend.wait_ready_sync(limit=STARTUP_LIMIT_SECONDS)
        self.peer.start()
        self.peer.wait_serving()
        return self.backend

    def health(self) -> dict[str, object]:
        answer = httpx.get(f"{self.http}/health", timeout=10).json()
        assert isinstance(answer, dict)
        return answer

    def store_health(self) -> dict[str, object]:
        section = self.health()["span_store"]
        assert isinstance(section, dict)
        return section

    def checkpoint(self) -> bytes | None:
        with sqlite3.connect(self.database) as conn:
            row = conn.execute("SELECT last_key FROM poller_state WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.peer.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    if not PEER_BINARY.exists():
        raise AssertionError(f"{PEER_BINARY} is missing: run `make peer`")
    deployment = Deployment(tmp_path)
    yield deployment
    deployment.close()


def test_serve_keeps_every_drained_span_in_its_duckdb_file(deployment: Deployment) -> None:
    seeded = junjo_traces(deployment.peer.wal_dir, TRACES)
    backend = deployment.start()
    backend.wait_for("span store", span_store="duckdb", path=str(deployment.store), limit=5)

    wait_until_sync_health(deployment, seeded.last_key)
    section = deployment.store_health()
    assert section["spans_stored"] == seeded.count
    assert section["open"] is True
    assert section["error"] is None
    assert isinstance(section["size_bytes"], int)
    assert section["size_bytes"] > 0
    # The read routes read through the store this process holds.
    names = httpx.get(f"{deployment.http}/otel/span-service-names", timeout=10)
    assert names.status_code == 200, names.text
    assert sorted(names.json()) == [f"seed-service-{n}" for n in range(4)]
    metrics = httpx.get(f"{deployment.http}/metrics", timeout=10).text
    assert f"junjo_store_spans {float(seeded.count)}" in metrics
    assert "junjo_store_open 1.0" in metrics
    assert "junjo_store_watermark_timestamp_seconds" in metrics

    backend.signal()
    assert backend.wait() == 0
    rows = store_rows(deployment.store)  # opens only once the backend let go of it
    assert rows.spans == rows.distinct_spans == seeded.count == TRACES * SPANS_PER_TRACE
    assert rows.patches == TRACES * PATCHES_PER_TRACE
    assert rows.set_aside == 0
    assert rows.watermark == seeded.last_key
    assert deployment.checkpoint() == seeded.last_key


def wait_until_sync_health(deployment: Deployment, last_key: bytes) -> None:
    """Until /health shows the store's watermark at `last_key`."""

    async def stored() -> bool:
        section = await asyncio.to_thread(deployment.store_health)
        return section["watermark"] == last_key.hex()

    asyncio.run(wait_until(stored, "the store holds the last WAL key", limit=120, every=0.1))


def _hold(path: Path) -> subprocess.Popen[str]:
    """Another process that opens the DuckDB file (as a Go backend would) until stdin closes."""
    script = (
        "import duckdb, sys\n"
        "db = duckdb.connect(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
        "db.close()\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


async def _validate(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = auth_pb2_grpc.InternalAuthServiceStub(channel)
        answer = await stub.ValidateApiKey(
            auth_pb2.ValidateApiKeyRequest(api_key="not-a-stored-key"), timeout=5
        )
    return answer.is_valid


def test_a_store_held_by_another_process_stops_the_drain_not_auth(
    deployment: Deployment,
) -> None:
    seeded = junjo_traces(deployment.peer.wal_dir, TRACES)
    holder = _hold(deployment.store)
    try:
        backend = deployment.start()
        line = backend.wait_for("span store unavailable", limit=STARTUP_LIMIT_SECONDS)
        reason = str(line["reason"])
        assert str(deployment.store) in reason
        assert f"pid {holder.pid}" in reason

        # Several retry intervals: it keeps trying, and drains nothing meanwhile.
        asyncio.run(asyncio.sleep(RETRY_SECONDS * 5))
        health = deployment.health()
        assert health["status"] == "degraded"
        poller = health["poller"]
        assert isinstance(poller, dict)
        assert poller["role"] == "standby"
        assert poller["spans_processed"] == 0
        section = deployment.store_health()
        assert section["error"] == reason
        assert section["open"] is False
        assert deployment.checkpoint() is None
        unread = httpx.get(f"{deployment.http}/otel/span-service-names", timeout=10)
        assert unread.status_code == 503
        assert asyncio.run(_validate(deployment.auth_address)) is False  # auth answers
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()

    backend.wait_for("span store open; the poller drains again", limit=STARTUP_LIMIT_SECONDS)
    wait_until_sync_health(deployment, seeded.last_key)
    assert deployment.health()["status"] == "ok"
    backend.signal()
    assert backend.wait() == 0
    assert store_rows(deployment.store).spans == seeded.count
