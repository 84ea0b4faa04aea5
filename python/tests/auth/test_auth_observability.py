"""What the auth server tells an operator: call metrics, refused-key summaries, gRPC health.

Real AuthServers on ephemeral ports, a real SQLite file, real channels.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from junjo_backend.auth.metrics import AuthCallMetrics
from junjo_backend.auth.server import READINESS_PROBE_KEY, SERVICE_NAME, AuthServer

from .auth_calls import SERVING, KeyRegistry, auth_stub, validate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.auth.key_store import NewApiKey
    from junjo_backend.settings import Settings

    from .conftest import RecordingHandler

    MakeKey = Callable[..., Awaitable[NewApiKey]]
    StartServer = Callable[..., Awaitable[AuthServer]]


@pytest.fixture
async def start_server(settings: Settings, engine: AsyncEngine) -> AsyncIterator[StartServer]:
    started: list[AuthServer] = []

    async def start(**options: object) -> AuthServer:
        server = AuthServer(settings, engine, **options)  # type: ignore[arg-type]
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(0)


def calls(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("junjo_auth_validate_calls_total", {"outcome": outcome})
    assert value is not None
    return value


def timed(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "junjo_auth_validate_duration_seconds_count", {"outcome": outcome}
    )
    assert value is not None
    return value


async def test_calls_are_counted_by_outcome_and_timed(
    start_server: StartServer,
    engine: AsyncEngine,
    settings: Settings,
    make_key: MakeKey,
    used_keys: KeyRegistry,
) -> None:
    registry = CollectorRegistry()
    server = await start_server(metrics=AuthCallMetrics(registry))
    key = await make_key()
    assert [calls(registry, outcome) for outcome in ("valid", "invalid", "error")] == [0, 0, 0]

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = auth_stub(channel)
        assert await validate(stub, key.key) is True
        assert await validate(stub, used_keys.unknown()) is False
        assert await validate(stub, used_keys.unknown()) is False
        assert await validate(stub, READINESS_PROBE_KEY) is False
        # A real fault: the table the server reads is renamed by another connection.
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_away"))
        await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await validate(stub, key.key)
        assert failure.value.code() is grpc.StatusCode.INTERNAL

    assert calls(registry, "valid") == 1
    assert calls(registry, "invalid") == 3  # the start-up probe is an invalid answer too
    assert calls(registry, "error") == 1
    assert [timed(registry, outcome) for outcome in ("valid", "invalid", "error")] == [1, 3, 1]
    assert registry.get_sample_value(
        "junjo_auth_validate_duration_seconds_sum", {"outcome": "valid"}
    )


async def test_refused_keys_are_summed_up_in_one_info_line_without_key_material(
    start_server: StartServer, used_keys: KeyRegistry, session_log: RecordingHandler
) -> None:
    server = await start_server(refused_summary_seconds=0.2)
    unknown = [used_keys.unknown() for _ in range(3)]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("API keys refused"):
                records.append(record)

    keep = Keep()
    logging.getLogger("junjo_backend.auth.server").addHandler(keep)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_stub(channel)
            # The ingestion-service's start-up probe is not a refused key.
            assert await validate(stub, READINESS_PROBE_KEY) is False
            for key in unknown:
                assert await validate(stub, key) is False
            async with asyncio.timeout(30):  # a hang guard
                while not records:  # noqa: ASYNC110 (the line comes from the server's keeper)
                    await asyncio.sleep(0.05)
            # Nothing refused since: no further line.
            await asyncio.sleep(0.5)
    finally:
        logging.getLogger("junjo_backend.auth.server").removeHandler(keep)

    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert records[0].__dict__["refused"] == 3
    assert not any(used_keys.found_in(line) for line in session_log.lines)


async def test_health_list_answers_every_service_without_an_error_logged(
    start_server: StartServer, session_log: RecordingHandler
) -> None:
    server = await start_server()
    before = len(session_log.lines)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.List(health_pb2.HealthListRequest(), timeout=5)

    assert {name: status.status for name, status in reply.statuses.items()} == {
        "": SERVING,
        SERVICE_NAME: SERVING,
    }
    assert not [line for line in session_log.lines[before:] if '"level": "ERROR"' in line]


async def _first_answer(stub: health_pb2_grpc.HealthStub) -> grpc.aio.UnaryStreamCall[Any, Any]:
    call: grpc.aio.UnaryStreamCall[Any, Any] = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await call.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == SERVING
    return call


async def test_health_watch_streams_are_capped(start_server: StartServer) -> None:
    server = await start_server(health_watch_limit=3)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [await _first_answer(stub) for _ in range(3)]

        refused = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await refused.read()
        assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        # A closed watch frees its place.
        watches.pop().cancel()
        async with asyncio.timeout(30):  # a hang guard
            while server.health_watches >= 3:  # noqa: ASYNC110 (the server sees the cancel)
                await asyncio.sleep(0.01)
        watches.append(await _first_answer(stub))
        for watch in watches:
            watch.cancel()


async def test_health_watch_streams_end_after_their_lifetime(start_server: StartServer) -> None:
    server = await start_server(health_watch_lifetime=0.3)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = await _first_answer(stub)
        async with asyncio.timeout(30):  # a hang guard
            end = await watch.read()
        assert end is grpc.aio.EOF
        assert await watch.code() is grpc.StatusCode.OK
