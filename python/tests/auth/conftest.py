"""Fixtures for the auth tests: a real SQLite file, a real AuthServer on an ephemeral port,
real channels, and a session-wide watch on every log record for key material."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from junjo_backend.auth.key_store import create_api_key
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.logs import JsonFormatter

from .auth_calls import MISS_FLOOR_PASSED, KeyRegistry, auth_stub

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend._wire.ingestion import auth_pb2_grpc
    from junjo_backend.auth.key_store import NewApiKey
    from junjo_backend.settings import Settings


class RecordingHandler(logging.Handler):
    """Keeps every record of the session, formatted at emit time with all its fields."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


# Package scope: the whole auth test session, and no longer, so that the DEBUG level and
# the recording stop before other test packages run.
@pytest.fixture(scope="package")
def used_keys() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture(scope="package")
def session_log(used_keys: KeyRegistry) -> Iterator[RecordingHandler]:
    """Every log record of the auth tests, at DEBUG; checked for keys when they are done."""
    root = logging.getLogger()
    handler = RecordingHandler()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    leaked = [line for line in handler.lines if used_keys.found_in(line)]
    assert not leaked, f"{len(leaked)} log records contain API keys"


@pytest.fixture(autouse=True)
def _watch_logs(session_log: RecordingHandler) -> RecordingHandler:
    return session_log


@pytest.fixture
def database_path(tmp_path: Path) -> Path:
    """Directly in tmp_path: tests here also open it with plain sqlite3 before the backend."""
    return tmp_path / "junjo.db"


@pytest.fixture
def settings_defaults() -> dict[str, object]:
    return {"grpc_shutdown_grace_seconds": 1.0}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url)
    await init_schema(engine)
    yield engine
    await close_engine(engine)


@pytest.fixture
def make_key(engine: AsyncEngine, used_keys: KeyRegistry) -> Callable[..., Awaitable[NewApiKey]]:
    async def make(name: str = "test app") -> NewApiKey:
        """Store a key; returns once a running server must find it (the miss floor passed)."""
        new = await create_api_key(engine, name)
        used_keys.add(new.key)
        await asyncio.sleep(MISS_FLOOR_PASSED)
        return new

    return make


@pytest.fixture
async def auth_server(settings: Settings, engine: AsyncEngine) -> AsyncIterator[AuthServer]:
    server = AuthServer(settings, engine)
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture
async def channel(auth_server: AuthServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> auth_pb2_grpc.InternalAuthServiceAsyncStub:
    return auth_stub(channel)


@dataclass(frozen=True, slots=True)
class RunningAuth:
    """A running AuthServer on the test's SQLite file, a channel to it, and the key set-up."""

    settings: Settings
    engine: AsyncEngine
    server: AuthServer
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.InternalAuthServiceAsyncStub
    make_key: Callable[..., Awaitable[NewApiKey]]


@pytest.fixture
def running(
    settings: Settings,
    engine: AsyncEngine,
    auth_server: AuthServer,
    channel: grpc.aio.Channel,
    make_key: Callable[..., Awaitable[NewApiKey]],
) -> RunningAuth:
    """The auth fixtures a fault test needs, in one."""
    return RunningAuth(settings, engine, auth_server, channel, auth_stub(channel), make_key)


@pytest.fixture(scope="session")
def console_script() -> str:
    """The installed `junjo-backend` command of this environment."""
    script = Path(sys.executable).parent / "junjo-backend"
    if not script.exists():
        pytest.fail(f"{script} is missing: is the package installed (uv sync)?")
    return str(script)
