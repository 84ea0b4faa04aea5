"""The app's lifespan through the real ASGI app: real ports, a real SQLite file, real gRPC."""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from asgi_lifespan import LifespanManager

from harness.waiting import port_is_free, wait_until
from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc
from junjo_backend.app import Backend, StartupError, create_app

from .backend_under_test import (
    corrupt_sqlite_file,
    drop_table,
    established_connections_to,
    open_files_under,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from junjo_backend.settings import Settings
    from tests.ingestion.fake_ingestion import FakeIngestionServer, FakeWal

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Backend]]:
    """The app with its lifespan started, an HTTP client on it, and the lifespan's state."""
    app = create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://backend"
        ) as http,
    ):
        backend = manager._state["backend"]
        assert isinstance(backend, Backend)
        yield http, backend


async def validate(address: str, key: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = auth_pb2_grpc.InternalAuthServiceStub(channel)
        reply = await stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(api_key=key), timeout=5)
        return reply.is_valid


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_lifespan_serves_and_then_releases_everything(
    make_settings: Callable[..., Settings],
    wal: FakeWal,
    ingestion: FakeIngestionServer,
    database_path: Path,
) -> None:
    tasks_before = other_tasks()
    settings = make_settings(ingestion_grpc_address=ingestion.address)

    async with running(settings) as (http, backend):
        ping = await http.get("/ping")
        assert (ping.status_code, ping.text) == (200, "pong")
        auth_port = backend.auth_server.port
        assert not port_is_free(auth_port)
        # The Go ingestion-service's start-up probe gets a prompt "no" on an empty database.
        assert await validate(backend.auth_server.address, "startup-readiness-check") is False
        await wait_until(
            lambda: (
                backend.poller is not None
                and backend.poller.status.spans_processed == len(wal.keys)
            ),
            "the poller processes every WAL entry",
        )
        body = (await http.get("/health")).json()
        assert established_connections_to(ingestion.port) > 0

    assert body["status"] == "ok"
    assert body["database"] == {"ok": True, "error": None}
    assert body["auth_server"]["running"] is True
    assert body["auth_server"]["address"] == f"127.0.0.1:{auth_port}"
    assert body["ingestion"] == {"address": ingestion.address, "reachable": True}
    assert body["poller"]["enabled"] is True
    assert body["poller"]["running"] is True
    assert body["poller"]["role"] == "leader"
    assert body["poller"]["role_since"] is not None
    assert body["poller"]["spans_processed"] == len(wal.keys)
    assert body["poller"]["entries_skipped"] == 0
    assert body["poller"]["last_key"] == wal.keys[-1].hex()
    assert body["poller"]["last_key_received_at"] is not None

    # After shutdown: no listening port, no database file held, no channel, no task (the
    # fake ingestion server's own tasks are not the backend's: it is stopped first).
    assert port_is_free(auth_port)
    assert open_files_under(database_path.parent) == []
    await wait_until(
        lambda: established_connections_to(ingestion.port) == 0,
        "no connection to the ingestion server is left",
    )
    await ingestion.stop()
    assert other_tasks() <= tasks_before
    assert backend.auth_server.running is False
    assert backend.poller is not None
    assert backend.poller.status.running is False


async def test_health_follows_the_ingestion_service_going_away_and_coming_back(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer
) -> None:
    settings = make_settings(ingestion_grpc_address=ingestion.address)
    async with running(settings) as (http, _backend):
        first = await http.get("/health")
        assert first.status_code == 200
        assert first.json()["ingestion"]["reachable"] is True

        await ingestion.stop()

        # /health makes no call of its own: it says what the poller's next read found.
        async def reported_down() -> bool:
            health = await http.get("/health")
            return bool(health.json()["ingestion"]["reachable"] is False)

        await wait_until(reported_down, "/health reports the ingestion-service unreachable")
        down = await http.get("/health")
        # Auth does not need the ingestion-service: degraded, still HTTP 200.
        assert down.status_code == 200
        assert down.json()["status"] == "degraded"
        assert down.json()["ingestion"]["reachable"] is False
        assert down.json()["poller"]["last_error"] is not None

        await ingestion.start()

        # gRPC reconnects with its own backoff, so the way back is waited for (bounded).
        async def healthy_again() -> bool:
            return bool((await http.get("/health")).json()["status"] == "ok")

        await wait_until(healthy_again, "/health says ok again", every=0.2)
        back = await http.get("/health")
        assert back.status_code == 200
        assert back.json()["status"] == "ok"
        assert back.json()["ingestion"]["reachable"] is True
        assert back.json()["poller"]["last_error"] is None


async def test_an_unreachable_ingestion_service_is_not_a_startup_failure(
    make_settings: Callable[..., Settings],
) -> None:
    # Port 1 on loopback: nothing listens there.
    async with running(make_settings(ingestion_grpc_address="127.0.0.1:1")) as (http, backend):
        response = await http.get("/health")
        assert await validate(backend.auth_server.address, "no-such-key") is False

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["ingestion"] == {"address": "127.0.0.1:1", "reachable": False}
    assert body["auth_server"]["running"] is True


async def test_health_is_503_when_the_database_is_unusable(
    make_settings: Callable[..., Settings], database_path: Path
) -> None:
    async with running(make_settings()) as (http, backend):
        assert (await http.get("/health")).status_code == 200
        # A real fault: the database file is replaced by bytes that are not SQLite. The
        # pool is emptied so that the next probe opens the file again.
        corrupt_sqlite_file(database_path)
        await backend.engine.dispose()
        response = await http.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"]["ok"] is False
    assert "DatabaseError" in body["database"]["error"]


async def test_health_is_503_when_the_api_keys_table_is_gone(
    make_settings: Callable[..., Settings], database_path: Path
) -> None:
    async with running(make_settings(poller_enabled=False)) as (http, _backend):
        # A real fault on a live connection: another process drops the table.
        drop_table(database_path, "api_keys")
        gone = await http.get("/health")

    assert gone.status_code == 503
    assert gone.json()["database"] == {
        "ok": False,
        "error": "OperationalError: no such table: api_keys",
    }


async def test_health_is_503_when_the_auth_server_is_down(
    make_settings: Callable[..., Settings],
) -> None:
    async with running(make_settings(poller_enabled=False)) as (http, backend):
        await backend.auth_server.stop()
        response = await http.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["auth_server"] == {"running": False, "address": None, "database_ok": True}
    assert body["poller"]["enabled"] is False
    assert body["poller"]["role"] is None


async def test_startup_failure_at_the_auth_server_stops_what_started_before_it(
    make_settings: Callable[..., Settings], database_path: Path
) -> None:
    tasks_before = other_tasks()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = make_settings(auth_grpc_listen_address=f"127.0.0.1:{port}")

        with pytest.raises(StartupError) as failure:
            async with running(settings):
                pytest.fail("the lifespan started although the auth port was taken")

    assert failure.value.step == "auth server"
    assert str(failure.value).startswith("AUTH_GRPC_LISTEN_ADDRESS: auth server could not start")
    assert str(failure.value).endswith("Address already in use")
    # The database step had run; it must have been closed again.
    assert open_files_under(database_path.parent) == []
    assert other_tasks() <= tasks_before


async def test_startup_failure_at_the_database_names_the_step(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{not_a_folder}/junjo.db")

    with pytest.raises(StartupError) as failure:
        async with running(settings):
            pytest.fail("the lifespan started without a database")

    assert failure.value.step == "database"
    assert open_files_under(tmp_path) == []
