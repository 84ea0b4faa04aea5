"""The backend as one process: FastAPI app, its lifespan, `/ping`, `/health`, and `serve`.

The lifespan starts the parts in dependency order (database, auth gRPC server, ingestion
client, span poller) and stops them in reverse. The ingestion-service being unreachable is
not a start-up failure: auth is what the ingestion-service needs from us first (it blocks
its own start-up on it), and the poller retries with backoff until the WAL is reachable.
With `POLLER_ENABLED=false` (an auth-only deployment) there is no ingestion client at all:
nothing dials the ingestion-service.

`/health` and `/metrics` read state the parts keep anyway; neither makes a gRPC call nor
changes anything (the database probe is a read).
"""

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Annotated, Literal, TypedDict

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.responses import Response as RawResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from junjo_backend import __version__
from junjo_backend.access_log import AccessLog
from junjo_backend.addresses import bound_socket, listen_problem
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import (
    SerialQueries,
    close_engine,
    database_label,
    open_database,
    sqlite_write_problem,
)
from junjo_backend.failures import error_line
from junjo_backend.http_protocol import bounded_h11_protocol
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.invocation import cli_command
from junjo_backend.metrics import CONTENT_TYPE, BackendMetrics
from junjo_backend.poller.loop import PollerStatus, SpanPoller
from junjo_backend.settings import Settings
from junjo_backend.span_api import access_note, install_span_api
from junjo_backend.store.api import DuckDBReader, PostgresReader, SpanReader, UnavailableReader
from junjo_backend.store.duckdb_store import DuckDBStore
from junjo_backend.store_wiring import (
    SpanStoreHealth,
    StoreChoice,
    build_span_store,
    span_store_health,
)

log = logging.getLogger(__name__)

SPANS_NOT_KEPT = "spans are not kept by this backend (SPAN_STORE=none)"

# uvicorn's exit status when the application could not start.
STARTUP_FAILURE_EXIT = 3


class StartupError(RuntimeError):
    """A start-up step failed; the steps started before it have been stopped again.

    The message is one line naming the setting behind the step and the cause.
    """

    def __init__(self, step: str, setting: str, cause: Exception) -> None:
        super().__init__(f"{setting}: {step} could not start: {error_line(cause)}")
        self.step = step


@dataclass(frozen=True, slots=True)
class Backend:
    """The running parts of the backend, as the lifespan started them."""

    settings: Settings
    engine: AsyncEngine
    auth_server: AuthServer
    ingestion: IngestionClient | None  # None when POLLER_ENABLED=false
    poller: SpanPoller | None
    metrics: BackendMetrics
    span_store: StoreChoice
    started_at: float = field(default_factory=time.monotonic)  # for /health's uptime
    # /health's database probes: each answers within its timeout, one in the database at a time.
    probes: SerialQueries = field(default_factory=SerialQueries)
    # What answers the /otel read routes: the span store's reader in a process that can
    # read spans, a 503 with the reason elsewhere.
    span_reader: SpanReader = field(default_factory=lambda: UnavailableReader(SPANS_NOT_KEPT))


class LifespanState(TypedDict):
    """What the lifespan hands to every request (Starlette's lifespan state)."""

    backend: Backend


@contextlib.contextmanager
def _startup_step(step: str, setting: str) -> Iterator[None]:
    """Turn any failure inside the block into a `StartupError` naming `step` and `setting`."""
    try:
        yield
    except Exception as exc:
        # Whoever runs the lifespan reports the raised error (`serve`: one `error:` line).
        log.debug("start-up step failed", exc_info=True, extra={"step": step})
        raise StartupError(step, setting, exc) from exc


async def _stop_step(
    step: str, stop: Callable[[], Awaitable[object]], started: asyncio.Event
) -> None:
    """Run one shutdown step; a failure is logged and does not keep the later steps from running.

    Until the whole backend has `started`, a stopped step is logged at DEBUG: after a failed
    start-up, the one line that matters is the error.
    """
    try:
        await stop()
    except Exception:
        log.exception("shutdown step failed", extra={"step": step})
    else:
        level = logging.INFO if started.is_set() else logging.DEBUG
        log.log(level, "stopped", extra={"step": step})


@contextlib.asynccontextmanager
async def run_backend(settings: Settings) -> AsyncIterator[Backend]:
    """Start every part of the backend, yield them, and stop them in reverse order.

    A step that fails raises `StartupError`; the steps before it are stopped first.
    """
    metrics = BackendMetrics()
    async with contextlib.AsyncExitStack() as stack:
        steps = _Steps(stack)
        engine = await _start_database(settings, steps)
        auth_server = await _start_auth_server(settings, engine, metrics, steps)
        ingestion: IngestionClient | None = None
        poller: SpanPoller | None = None
        span_store = StoreChoice("none", None, None)
        if settings.poller_enabled:
            ingestion = await _start_ingestion_client(settings, steps)
            span_store = _span_store(settings, engine)
            poller = await _start_poller(settings, ingestion, engine, span_store, steps)
        else:
            log.info(
                "span poller disabled (POLLER_ENABLED=false); the ingestion-service is not dialled"
            )
        metrics.watch(auth_server.known_keys, poller, ingestion)

        steps.started.set()
        reader = span_reader(settings, engine, span_store.store)
        backend = Backend(
            settings,
            engine,
            auth_server,
            ingestion,
            poller,
            metrics,
            span_store,
            span_reader=reader,
        )
        stack.push_async_callback(backend.probes.close)
        yield backend
        log.info("shutting down")
    log.info("shut down")


def span_reader(settings: Settings, engine: AsyncEngine, store: object | None) -> SpanReader:
    """What answers the /otel routes in this process (docs/design/span-api.md).

    PostgreSQL: every replica reads through its engine. DuckDB: the store object, which
    only the poller's leader holds open (a standby's cursor is refused with the reason).
    """
    kind = settings.span_store_kind
    if kind == "database" or settings.span_store == "database":
        return PostgresReader(engine)
    if isinstance(store, DuckDBStore):
        return DuckDBReader(store.cursor)
    if kind == "duckdb":
        return UnavailableReader(
            "the DuckDB span store is not open in this process: only the poller's leader opens it"
        )
    return UnavailableReader(SPANS_NOT_KEPT)


@dataclass(frozen=True, slots=True)
class _Steps:
    """The started steps, each stopped (in reverse) when the stack closes."""

    stack: contextlib.AsyncExitStack
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the whole backend is up

    def stop_later(self, step: str, stop: Callable[[], Awaitable[object]]) -> None:
        self.stack.push_async_callback(_stop_step, step, stop, self.started)


async def _start_database(settings: Settings, steps: _Steps) -> AsyncEngine:
    with _startup_step("database", "DATABASE_URL"):
        # Creates the schema (and a SQLite file) only now: after start-up a missing
        # SQLite file is an error, never a new empty database.
        engine = await open_database(
            settings.database_url,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
        )
        steps.stop_later("database", functools.partial(close_engine, engine))
    log.info("database ready", extra={"database": database_label(settings.database_url)})
    return engine


async def _start_auth_server(
    settings: Settings, engine: AsyncEngine, metrics: BackendMetrics, steps: _Steps
) -> AuthServer:
    with _startup_step("auth server", "AUTH_GRPC_LISTEN_ADDRESS"):
        auth_server = AuthServer(settings, engine, metrics=metrics.auth)
        steps.stop_later(
            "auth server", functools.partial(auth_server.stop, settings.grpc_shutdown_grace_seconds)
        )
        await auth_server.start()
    return auth_server


async def _start_ingestion_client(settings: Settings, steps: _Steps) -> IngestionClient:
    """The ReadSpans client; an unreachable ingestion-service is a warning, not a failure."""
    with _startup_step("ingestion client", "INGESTION_GRPC_ADDRESS"):
        ingestion = IngestionClient(settings=settings)
        steps.stop_later("ingestion client", ingestion.close)
        await ingestion.connect()
    if await ingestion.check_connection(settings.health_probe_timeout_seconds):
        log.info("ingestion-service reachable", extra={"address": settings.ingestion_grpc_address})
    else:
        log.warning(
            "ingestion-service not reachable yet; auth is served and the poller keeps retrying",
            extra={"address": settings.ingestion_grpc_address},
        )
    return ingestion


def _span_store(settings: Settings, engine: AsyncEngine) -> StoreChoice:
    """The span store SPAN_STORE asks for (opened later, by the poller once it leads)."""
    with _startup_step("span store", "SPAN_STORE"):
        choice = build_span_store(settings, engine)
    if choice.store is None:
        log.warning(
            "SPAN_STORE=none: drained spans are counted and kept nowhere",
            extra={"span_store": choice.kind},
        )
    else:
        # Only the poller's leader opens it: a file held elsewhere is reported there.
        log.info("span store", extra={"span_store": choice.kind, "path": choice.location})
    return choice


async def _start_poller(
    settings: Settings,
    ingestion: IngestionClient,
    engine: AsyncEngine,
    span_store: StoreChoice,
    steps: _Steps,
) -> SpanPoller:
    with _startup_step("span poller", "DATABASE_URL"):
        poller = SpanPoller(ingestion, engine, settings=settings, store=span_store.store)
        steps.stop_later("span poller", poller.stop)
        await poller.start()
    return poller


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatabaseHealth(_Frozen):
    """The database answered a query just now, or why it did not."""

    ok: bool
    error: str | None


class AuthServerHealth(_Frozen):
    """The auth gRPC server the ingestion-service validates keys against."""

    running: bool
    address: str | None
    database_ok: bool


class IngestionHealth(_Frozen):
    """Whether the ingestion-service answered the poller's last call or probe (none of its own).

    `reachable` is null with `POLLER_ENABLED=false` (nothing dials it), before anything was
    seen, and when what was seen is more than 5 s old.
    """

    address: str
    reachable: bool | None


class Health(_Frozen):
    """The `/health` body, with an overall status.

    `unavailable` (HTTP 503) when the database or the auth server is down: the
    ingestion-service cannot validate keys. `degraded` (HTTP 200) when only the ingestion
    side is down or failing, the poller is not running or the span store cannot be opened:
    auth still serves, spans wait in the WAL.
    """

    status: Literal["ok", "degraded", "unavailable"]
    version: str
    uptime_seconds: float
    database: DatabaseHealth
    auth_server: AuthServerHealth
    ingestion: IngestionHealth
    poller: PollerStatus
    span_store: SpanStoreHealth


async def _read_api_keys_table(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        try:
            await conn.execute(text("SELECT 1 FROM api_keys LIMIT 1"))
        except SQLAlchemyError:
            # A connection that failed (a restarted server, a broken file) must not go
            # back to the pool and fail the next probe after a recovery.
            with contextlib.suppress(SQLAlchemyError):
                await conn.invalidate()
            raise


async def _probe_database(
    engine: AsyncEngine, within: float, probes: SerialQueries
) -> DatabaseHealth:
    """Read the api_keys table, the one the auth server cannot answer without.

    Answers `within` seconds even while SQLite waits for a lock (`SerialQueries`).
    """
    try:
        await probes.run(functools.partial(_read_api_keys_table, engine), within)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        return DatabaseHealth(ok=False, error=error_line(exc))
    return DatabaseHealth(ok=True, error=None)


async def check_health(backend: Backend) -> Health:
    """Probe the database; read the rest from the parts' own state (no gRPC call is made)."""
    database = await _probe_database(
        backend.engine, backend.settings.health_probe_timeout_seconds, backend.probes
    )
    auth = backend.auth_server
    auth_health = AuthServerHealth(
        running=auth.running,
        address=auth.address if auth.running else None,
        database_ok=auth.database_ok,
    )
    poller = backend.poller.status if backend.poller is not None else PollerStatus.disabled()
    reachable = backend.ingestion.reachable if backend.ingestion is not None else None
    span_store = span_store_health(backend.span_store, backend.poller)
    status: Literal["ok", "degraded", "unavailable"] = "ok"
    if not (database.ok and auth_health.running):
        status = "unavailable"
    elif poller.enabled and not (
        reachable and poller.running and poller.last_error is None and span_store.error is None
    ):
        status = "degraded"
    return Health(
        status=status,
        version=__version__,
        uptime_seconds=round(time.monotonic() - backend.started_at, 3),
        database=database,
        auth_server=auth_health,
        ingestion=IngestionHealth(
            address=backend.settings.ingestion_grpc_address, reachable=reachable
        ),
        poller=poller,
        span_store=span_store,
    )


def _backend(request: Request) -> Backend:
    backend = request.state.backend
    if not isinstance(backend, Backend):  # pragma: no cover - only without the lifespan
        raise TypeError("the app was served without its lifespan")
    return backend


RunningBackend = Annotated[Backend, Depends(_backend)]


@dataclass(slots=True)
class StartedBackend:
    """Where `serve` puts the backend it started itself, for the app's lifespan to hand out."""

    backend: Backend | None = None


def create_app(settings: Settings, *, started: StartedBackend | None = None) -> FastAPI:
    """The FastAPI app; nothing starts until its lifespan runs.

    Given `started` (as `serve` does, to report a failed start-up in one line), the lifespan
    hands out the backend already running there and leaves stopping it to the caller.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[LifespanState]:
        if started is not None:
            if started.backend is None:
                raise RuntimeError("the app was served before its backend started")
            yield {"backend": started.backend}
            return
        async with run_backend(settings) as backend:
            yield {"backend": backend}

    app = FastAPI(title="junjo-backend", version=__version__, lifespan=lifespan)

    @app.get("/ping", response_class=PlainTextResponse)
    async def ping() -> str:
        """Liveness, as the Go backend answered it (the compose health check)."""
        return "pong"

    @app.api_route("/health", methods=["GET", "HEAD"], responses={503: {"model": Health}})
    async def health(backend: RunningBackend, response: Response) -> Health:
        """Each part's state; HTTP 503 when a part that auth needs is down."""
        body = await check_health(backend)
        if body.status == "unavailable":
            response.status_code = 503
        return body

    @app.get("/metrics", response_class=RawResponse)
    async def metrics(backend: RunningBackend) -> RawResponse:
        """The backend's metrics in the Prometheus text format (README: "Metrics")."""
        return RawResponse(backend.metrics.render(), media_type=CONTENT_TYPE)

    install_span_api(app, settings, lambda request: _backend(request).span_reader)
    return app


class _BackendServer(uvicorn.Server):
    """uvicorn's server with our signal policy and a start-up banner.

    The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once.
    uvicorn's own handling re-raises the signal after a graceful shutdown (so the exit
    status says "killed") and forces only on a second SIGINT, not on a second SIGTERM.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install our handlers for the server's lifetime, then restore the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.should_exit:
            log.info(
                "shutting down gracefully; send the signal again to force exit",
                extra={"signal": name},
            )
            self.should_exit = True
            return
        log.warning("second signal: exiting without finishing shutdown", extra={"signal": name})
        # Deliberately abrupt: whatever step is stuck (a gRPC drain, a database checkpoint)
        # is what the operator asked to skip. SQLite's journal keeps the file consistent.
        os._exit(128 + signum)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then say where each part listens."""
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        where: dict[str, object] = {"http": f"http://{host}:{port}", "http_port": port}
        backend = self.lifespan.state.get("backend")
        if isinstance(backend, Backend):
            where["auth_grpc"] = backend.auth_server.address
            where["ingestion_grpc"] = backend.settings.ingestion_grpc_address
            where["database"] = database_label(backend.settings.database_url)
        for note in backend.settings.notes if isinstance(backend, Backend) else []:
            log.info(note)
        if isinstance(backend, Backend):
            log.log(*access_note(backend.settings))
        log.info(
            "junjo-backend ready; create an API key with: %s api-keys create NAME",
            cli_command(),
            extra=where,
        )


def _bind_http(settings: Settings) -> socket.socket:
    """The HTTP API's listening socket, bound before anything starts; errors name the setting."""
    try:
        sock = bound_socket(settings.http_host, settings.http_port, backlog=2048)
    except socket.gaierror as exc:
        reason = exc.strerror
        raise ServeError(f"HTTP_HOST: cannot resolve {settings.http_host!r}: {reason}") from None
    except OSError as exc:
        raise ServeError(
            f"HTTP_HOST/HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port}: "
            f"{exc.strerror or exc}"
        ) from None
    sock.setblocking(False)  # noqa: FBT003 (socket API)
    return sock


def _probe_auth_address(settings: Settings) -> None:
    """Fail before anything starts when the auth address cannot be bound."""
    problem = listen_problem(settings.auth_grpc_listen_address)
    if problem is not None:
        raise ServeError(
            f"AUTH_GRPC_LISTEN_ADDRESS: cannot listen on {settings.auth_grpc_listen_address}: "
            f"{problem}"
        )


class ServeError(RuntimeError):
    """`serve` could not start; the message is one line naming the setting and the cause."""


async def _serve(settings: Settings, http_socket: socket.socket) -> None:
    started = StartedBackend()
    config = uvicorn.Config(
        AccessLog(create_app(settings, started=started)),
        # Our logging set-up (logs.configure_logging) formats uvicorn's records too.
        log_config=None,
        # uvicorn's access log writes paths and query strings as sent (a key a client put
        # in a URL with them); ours names routes (access_log.py).
        access_log=False,
        # A failing lifespan must stop the process, not be taken for "unsupported".
        lifespan="on",
        # grpc.aio needs the standard asyncio loop.
        loop="asyncio",
        timeout_graceful_shutdown=math.ceil(settings.grpc_shutdown_grace_seconds),
        server_header=False,
        # uvicorn has no request-head timeout and no connection cap: slow-loris and idle
        # connections would stay open forever (see http_protocol.py).
        http=bounded_h11_protocol(
            settings.http_header_timeout_seconds, settings.http_max_connections
        ),
    )
    server = _BackendServer(config)
    # Our signal policy covers the backend's start and stop too, not only uvicorn's part.
    with server.capture_signals():
        try:
            async with run_backend(settings) as backend:
                started.backend = backend
                if not server.should_exit:
                    await server.serve(sockets=[http_socket])
        except StartupError as exc:
            raise ServeError(str(exc)) from exc


def serve(settings: Settings) -> int:
    """Run the backend with uvicorn until SIGINT or SIGTERM; returns the exit status.

    A start-up failure raises `ServeError` (one line naming the setting) before the HTTP API
    answers anything: its socket is bound first, then the backend starts, then uvicorn serves.
    """
    problem = sqlite_write_problem(settings.database_url)
    if problem is not None:
        raise ServeError(f"DATABASE_URL: {problem}")
    _probe_auth_address(settings)
    http_socket = _bind_http(settings)
    try:
        asyncio.run(_serve(settings, http_socket))
    except SystemExit as exit_:  # uvicorn exits this way when start-up fails
        return exit_.code if isinstance(exit_.code, int) else STARTUP_FAILURE_EXIT
    finally:
        http_socket.close()
    return 0
