"""Fixtures for the auth tests: a real SQLite file, a real AuthServer on an ephemeral port,
real channels, and a session-wide watch on every log record for key material."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from junjo_backend.api_keys import create_api_key
from junjo_backend.auth_service import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.logs import JsonFormatter
from junjo_backend.settings import Settings

from .auth_calls import MISS_FLOOR_PASSED, KeyRegistry, auth_stub
from .postgres_binaries import find_pg_tool, missing_postgres

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend._wire.ingestion import auth_pb2_grpc
    from junjo_backend.api_keys import NewApiKey


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
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'junjo.db'}"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        auth_grpc_listen_address="127.0.0.1:0",
        grpc_shutdown_grace_seconds=1.0,
        _env_file=None,
    )


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


# --- A throwaway PostgreSQL cluster -------------------------------------------------------

_PG_READY = "database system is ready to accept connections"


class PostgresCluster:
    """A PostgreSQL server on 127.0.0.1, a child of this process, data in a temporary folder.

    `postgres` runs directly (not through pg_ctl, whose daemon would be nobody's child),
    so stopping it also reaps it.
    """

    def __init__(self, postgres: str, folder: Path, port: int, user: str | None) -> None:
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
        self._command = [postgres, "-D", str(folder / "data"), "-p", str(port)]
        self._command += ["-h", "127.0.0.1", "-k", str(folder), "-F"]
        self._log = folder / "postgres.log"
        self._user = user
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        offset = self._log.stat().st_size if self._log.exists() else 0
        with self._log.open("ab") as log_file:
            self._process = subprocess.Popen(
                self._command, stdout=log_file, stderr=log_file, user=self._user
            )
        for _ in range(600):
            if _PG_READY in self._log.read_bytes()[offset:].decode(errors="replace"):
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"PostgreSQL did not start: {self._log.read_text(errors='replace')}")

    def stop(self) -> None:
        """Fast shutdown (open connections are closed), and wait for the server to exit."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def _free_port() -> int:
    # PostgreSQL cannot bind port 0 and report it; a just-released ephemeral port is the
    # usual way, with a small race that a retry would cover.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway cluster for the session; without the binaries, skipped (failed under CI)."""
    initdb, server = find_pg_tool("initdb"), find_pg_tool("postgres")
    if initdb is None or server is None:
        missing_postgres(
            "PostgreSQL binaries (initdb, postgres) are not on PATH nor in pg_config's bindir"
        )
    # PostgreSQL refuses to run as root: then it runs as nobody.
    user = "nobody" if os.geteuid() == 0 else None
    # Under /tmp rather than tmp_path: pytest's base folder is private to this user, and
    # the cluster's user must reach its own files.
    folder = Path(tempfile.mkdtemp(prefix="junjo-pg-"))
    try:
        if user is not None:
            shutil.chown(folder, user=user)
        subprocess.run(
            [initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
            user=user,
        )
        cluster = PostgresCluster(server, folder, _free_port(), user)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def console_script() -> str:
    """The installed `junjo-backend` command of this environment."""
    script = Path(sys.executable).parent / "junjo-backend"
    if not script.exists():
        pytest.fail(f"{script} is missing: is the package installed (uv sync)?")
    return str(script)
