"""InternalAuthService: answers the Go ingestion-service's ValidateApiKey calls.

`AuthServer` owns one `grpc.aio` server with three services: ValidateApiKey, the standard
grpc.health.v1 Health (SERVING while the api_keys table can be read; Check, List, and
Watch with a cap and a lifetime), and, only when `grpc_reflection_enabled`, server
reflection. Answers come from `KnownKeys`, a snapshot of the table at most
`api_key_cache_max_age_seconds` old, kept fresh by a background task. Calls are counted in
`AuthCallMetrics`; refused keys are summed up in one INFO line per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import traceback
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_health.v1.health import aio as health_aio  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from junjo_backend._wire.ingestion import auth_pb2
from junjo_backend.addresses import format_address, listen_problem, parse_address
from junjo_backend.auth.known_keys import KeyStoreUnavailable, KnownKeys
from junjo_backend.auth.metrics import AuthCallMetrics
from junjo_backend.logs import LogRateLimit

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import TypeAlias

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.settings import Settings

    _Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    _UnaryBehavior: TypeAlias = Callable[[Any, _Context], Awaitable[Any]]

log = logging.getLogger(__name__)

SERVICE_NAME: str = auth_pb2.DESCRIPTOR.services_by_name["InternalAuthService"].full_name
VALIDATE_METHOD = f"/{SERVICE_NAME}/ValidateApiKey"
# The key the ingestion-service sends once at start-up, before it serves anything. It can
# never be an issued key (64 characters of [0-9A-Za-z]), so it is answered false without a
# lookup: promptly, on an empty database, and while the database is down.
READINESS_PROBE_KEY = "startup-readiness-check"
# Issued keys are 64 characters; anything much longer is not a key, and is refused before
# it costs a lookup.
MAX_KEY_BYTES = 256

# Calls that have arrived but that the server has not picked up yet queue in grpc core;
# past the soft limit, core sheds new arrivals at random (all of them at the hard limit)
# with CANCELLED. A call whose client hung up or whose deadline passed stays in that queue
# until the server picks it up, so a flood of such calls on the ingestion-service's one
# connection, faster than this server's call rate, makes core shed legitimate calls too.
# The cap is grpc/grpc#34782; grpc/grpc#38164 reports the same bare CANCELLED from an
# overloaded Python server. These are core's defaults, kept on purpose and stated here: a
# larger queue trades the shedding for queueing delay that grows past the
# ingestion-service's 5 s deadline, a smaller one sheds earlier. What spills is measured by
# the fault suite (tests/faults/test_auth_deadline_flood.py).
PENDING_CALLS_SOFT_LIMIT = 1000
PENDING_CALLS_HARD_LIMIT = 3000
# grpc's own DEBUG lines come once per call and once more per cancelled call: at
# LOG_LEVEL=DEBUG a flood of dead calls would become a log storm that slows the server
# further. CallLogInterceptor already logs every call, with a burst limit on failures.
_GRPC_INTERNALS_LOGGER = "grpc._cython.cygrpc"

# Both answers are constants, serialized once: the handler returns bytes.
_VALID = auth_pb2.ValidateApiKeyResponse(is_valid=True).SerializeToString()
_INVALID = auth_pb2.ValidateApiKeyResponse(is_valid=False).SerializeToString()

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Each open Health/Watch stream holds a task and its buffers (5,000 of them measured ~70 MB):
# at most this many at once (more are refused with RESOURCE_EXHAUSTED), each ended (OK) after
# this long, after which a client watches again, as grpc's health-checking clients do.
HEALTH_WATCH_LIMIT = 100
HEALTH_WATCH_LIFETIME_SECONDS = 300.0
# Refused keys are summed up in one INFO line at most this often (none when none were refused).
REFUSED_SUMMARY_SECONDS = 10.0

# Codes that say the caller asked for something we cannot give, rather than a fault here.
_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class InternalAuthServicer:
    """The ValidateApiKey handler.

    It takes and returns raw bytes rather than messages, unlike the generated servicer:
    parsing the request here lets a request whose string is not UTF-8 fail with
    INVALID_ARGUMENT (the generated deserializer would turn it into UNKNOWN), and the two
    possible answers are serialized once.
    """

    def __init__(self, keys: KnownKeys, metrics: AuthCallMetrics) -> None:
        self._keys = keys
        self._metrics = metrics
        # Keys answered is_valid=false: no line each, a summary (AuthServer) of the count.
        self.refused = LogRateLimit(math.inf, burst=0)

    async def ValidateApiKey(self, request: bytes, context: _Context) -> bytes:
        """is_valid=true only for a key in the database; INTERNAL when it cannot be read."""
        started = time.perf_counter()
        try:
            key = auth_pb2.ValidateApiKeyRequest.FromString(request).api_key
        except DecodeError:
            self._metrics.error.observe(started)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "not a ValidateApiKeyRequest (api_key must be UTF-8)",
            )
        if key == READINESS_PROBE_KEY:  # the ingestion-service's start-up probe is no refusal
            self._metrics.invalid.observe(started)
            return _INVALID
        if (
            not key
            or len(key) > MAX_KEY_BYTES
            or (not key.isascii() and len(key.encode()) > MAX_KEY_BYTES)
        ):
            return self._refuse(started)
        try:
            known = await self._keys.contains(key)
        except KeyStoreUnavailable:
            self._metrics.error.observe(started)
            await context.abort(grpc.StatusCode.INTERNAL, "the API key store is unavailable")
        except asyncio.CancelledError:
            self._metrics.error.observe(started)
            raise
        if known:
            self._metrics.valid.observe(started)
            return _VALID
        return self._refuse(started)

    def _refuse(self, started: float) -> bytes:
        self.refused.admit()
        self._metrics.invalid.observe(started)
        return _INVALID

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """The service's handlers by method name, for `add_registered_method_handlers`."""
        return {"ValidateApiKey": grpc.unary_unary_rpc_method_handler(self.ValidateApiKey)}


class CallLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs each unary call: method, status code, duration. Never a request or its metadata.

    A call that ends OK is logged at DEBUG, and only formatted when DEBUG is on, which
    keeps the OK path cheap; other outcomes at INFO (the caller's doing) or WARNING, at
    most `burst_per_second` lines per method and code, so an outage under load does not
    become a log storm (the next line says how many were left out). Wrapped handlers are
    built once per method. Streaming methods (health Watch, reflection) are long-lived by
    design and pass through unlogged.
    """

    def __init__(self, burst_per_second: int = 10) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._burst = burst_per_second
        self._limits: dict[tuple[str, grpc.StatusCode], LogRateLimit] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The method's handler, wrapped to log its outcome."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._logged(method, handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _logged(self, method: str, behavior: _UnaryBehavior) -> _UnaryBehavior:
        async def logged(request: object, context: _Context) -> object:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except asyncio.CancelledError:
                self._log_failure(method, grpc.StatusCode.CANCELLED, started)
                raise
            except BaseException as failure:
                code = context.code()
                # An exception that is not an abort becomes UNKNOWN on the wire.
                if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
                    code = grpc.StatusCode.UNKNOWN
                self._log_failure(method, code, started)
                # grpc keeps an abort's exception on the call's state, and the exception's
                # traceback holds these frames, whose `context` holds that state: a cycle
                # per failed call that kept the call, its context and the server alive past
                # stop() and past their event loop, until the cyclic GC freed them at some
                # later moment on some thread. Dropping the frames' references breaks it.
                traceback.clear_frames(failure.__traceback__)
                del context
                raise
            if log.isEnabledFor(logging.DEBUG):
                _log_call(logging.DEBUG, method, grpc.StatusCode.OK, started, 0)
            return response

        return logged

    def _log_failure(self, method: str, code: grpc.StatusCode, started: float) -> None:
        limit = self._limits.get((method, code))
        if limit is None:
            limit = self._limits[(method, code)] = LogRateLimit(1.0, burst=self._burst)
        left_out = limit.admit()
        if left_out is None:
            return
        level = logging.INFO if code in _CLIENT_CODES else logging.WARNING
        _log_call(level, method, code, started, left_out)


def _log_call(
    level: int, method: str, code: grpc.StatusCode, started: float, left_out: int
) -> None:
    fields: dict[str, object] = {
        "grpc_method": method,
        "grpc_code": code.name,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    if left_out:
        fields["calls_not_logged"] = left_out
    log.log(level, "grpc call", extra=fields)


def _quiet_grpc_internals() -> None:
    internals = logging.getLogger(_GRPC_INTERNALS_LOGGER)
    if internals.level < logging.INFO:  # NOTSET too: it would follow a DEBUG root
        internals.setLevel(logging.INFO)


async def _bind(server: grpc.aio.Server, address: str) -> int:
    """Bind `address`; the port bound. When it cannot, stop `server` and say why (OSError)."""
    try:
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        await server.stop(None)
        reason = listen_problem(address) or str(exc)
        raise OSError(f"cannot listen on {address}: {reason}") from exc


def _report_keeper_exit(task: asyncio.Task[None]) -> None:
    # The keeper only ends by cancellation; anything else would silently freeze health
    # and leave refreshes to the calls alone, so it is reported loudly.
    if not task.cancelled() and task.exception() is not None:
        log.error("the API key refresher stopped", exc_info=task.exception())


class BoundedHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpc_health's aio servicer plus `List`, which 1.85 lacks, and bounded `Watch` streams.

    Without `List`, every List call raised NotImplementedError inside the server and logged
    an ERROR traceback.
    """

    def __init__(self, *, watch_limit: int, watch_lifetime: float) -> None:
        super().__init__()
        self._watch_limit = watch_limit
        self._watch_lifetime = watch_lifetime
        self.watches = 0  # open Watch streams

    async def List(
        self,
        request: health_pb2.HealthListRequest,  # noqa: ARG002 (it has no fields)
        context: _Context,  # noqa: ARG002 (nothing to abort)
    ) -> health_pb2.HealthListResponse:
        """Every registered service with its status ("" is the whole server)."""
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._server_status.items()
            }
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: _Context) -> None:
        """Stream status changes; past the cap RESOURCE_EXHAUSTED, past the lifetime the end."""
        if self.watches >= self._watch_limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self._watch_limit} health watches at once; use Check",
            )
        self.watches += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._watch_lifetime):
                    await super().Watch(request, context)
        finally:
            self.watches -= 1


class AuthServer:
    """The auth gRPC server: started and stopped by the FastAPI lifespan or by tests.

    `metrics` defaults to counters of its own (a fresh registry), for tests and benchmarks.
    """

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        metrics: AuthCallMetrics | None = None,
        health_watch_limit: int = HEALTH_WATCH_LIMIT,
        health_watch_lifetime: float = HEALTH_WATCH_LIFETIME_SECONDS,
        refused_summary_seconds: float = REFUSED_SUMMARY_SECONDS,
    ) -> None:
        self._settings = settings
        try:
            self._host, _ = parse_address(settings.auth_grpc_listen_address)
        except ValueError as exc:
            address = settings.auth_grpc_listen_address
            raise ValueError(f"not a host:port address: {address!r} ({exc})") from None
        self._keys = KnownKeys(engine, max_age=settings.api_key_cache_max_age_seconds)
        self._metrics = metrics if metrics is not None else AuthCallMetrics(CollectorRegistry())
        self._servicer = InternalAuthServicer(self._keys, self._metrics)
        self._health_watch_limit = health_watch_limit
        self._health_watch_lifetime = health_watch_lifetime
        self._refused_summary_seconds = refused_summary_seconds
        self._last_refused_summary = time.monotonic()
        self._server: grpc.aio.Server | None = None
        self._health: BoundedHealthServicer | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._port = 0
        self._health_serving: bool | None = None

    @property
    def port(self) -> int:
        """The bound port (0 before `start`)."""
        return self._port

    @property
    def address(self) -> str:
        """`host:port` as bound, e.g. `127.0.0.1:41234` for a configured `127.0.0.1:0`."""
        return format_address(self._host, self._port)

    @property
    def running(self) -> bool:
        """Whether the server is started and not stopping or stopped."""
        return self._server is not None and self._stopping is None

    @property
    def database_ok(self) -> bool:
        """Whether the latest read of the api_keys table succeeded (drives the health status)."""
        return self._keys.available is True

    @property
    def health_watches(self) -> int:
        """Health/Watch streams open now."""
        return 0 if self._health is None else self._health.watches

    @property
    def known_keys(self) -> KnownKeys:
        """The key snapshot the server answers from (for status pages and benchmarks)."""
        return self._keys

    async def start(self) -> None:
        """Read the keys, bind the configured address and serve; raises if it cannot bind.

        A database that cannot be read at start does not stop the server: it serves
        NOT_SERVING health and INTERNAL answers, and recovers when the database does.
        """
        if self._server is not None:
            raise RuntimeError("AuthServer.start() called twice")
        await self._keys.refresh()
        _quiet_grpc_internals()
        server = await self._build_server()
        port = await _bind(server, self._settings.auth_grpc_listen_address)
        await server.start()
        self._server = server
        self._port = port
        self._keeper = asyncio.create_task(self._keep_keys_fresh(), name="api-keys-keeper")
        self._keeper.add_done_callback(_report_keeper_exit)
        log.info(
            "auth gRPC server listening",
            extra={
                "address": self.address,
                "keys": self._keys.size,
                "database_ok": self.database_ok,
                "reflection": self._settings.grpc_reflection_enabled,
            },
        )

    async def _build_server(self) -> grpc.aio.Server:
        """The server with its services (health already published), not yet bound."""
        server = grpc.aio.server(
            interceptors=[CallLogInterceptor()],
            options=[
                # Without this, Linux lets a second server bind the same port and steal calls.
                ("grpc.so_reuseport", 0),
                ("grpc.server.max_pending_requests", PENDING_CALLS_SOFT_LIMIT),
                ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_HARD_LIMIT),
            ],
        )
        handlers = self._servicer.method_handlers()
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)]
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self._health = BoundedHealthServicer(
            watch_limit=self._health_watch_limit, watch_lifetime=self._health_watch_lifetime
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._publish_health()
        if self._settings.grpc_reflection_enabled:
            reflection.enable_server_reflection(
                [
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
        return server

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: health goes NOT_SERVING, calls under way get `grace` seconds.

        `grace` defaults to `grpc_shutdown_grace_seconds`. Safe to call more than once and
        concurrently; every caller returns once the server is down.
        """
        if self._server is None:
            return
        if self._stopping is None:
            grace = self._settings.grpc_shutdown_grace_seconds if grace is None else grace
            self._stopping = asyncio.create_task(self._stop(self._server, grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, server: grpc.aio.Server, grace: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        await server.stop(grace)
        self._summarize_refused()
        await self._keys.close()
        log.info("auth gRPC server stopped", extra={"address": self.address})

    async def _keep_keys_fresh(self) -> None:
        # Refresh at half the max age so that calls almost never wait for a read, and so
        # that health follows the database even when no call comes in.
        interval = self._keys.max_age / 2
        while True:
            if self._keys.age() >= interval:
                await self._keys.refresh()
            await self._publish_health()
            if time.monotonic() - self._last_refused_summary >= self._refused_summary_seconds:
                self._summarize_refused()
            delay = interval - self._keys.age() if self._keys.available else interval
            await asyncio.sleep(max(delay, 0.001))

    def _summarize_refused(self) -> None:
        """One INFO line with how many keys were refused since the last one (none: no line)."""
        now = time.monotonic()
        refused = self._servicer.refused.flush()
        if refused:
            log.info(
                "API keys refused: not in the database (is_valid=false)",
                extra={
                    "refused": refused,
                    "interval_seconds": round(now - self._last_refused_summary, 3),
                },
            )
        self._last_refused_summary = now

    async def _publish_health(self) -> None:
        if self._health is None:
            return
        serving = self.database_ok
        if serving == self._health_serving:
            return
        self._health_serving = serving
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
