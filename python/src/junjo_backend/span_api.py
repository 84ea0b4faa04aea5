"""The Go backend's six span read routes (`/otel/...`), their access rule and input checks.

Access depends on `HTTP_HOST` alone: on a loopback host the routes are open; anywhere else
they need `Authorization: Bearer <SPAN_API_TOKEN>`, and answer 403 while no token is set.
Ingestion API keys never open them. Every error body is `{"error": "..."}`, as Go's are.
See `docs/design/span-api.md`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from typing import TYPE_CHECKING, Final

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from junjo_backend.store.api import (
    NESTED_SPANS,
    ONE_SPAN,
    ROOT_SPANS,
    ROOT_SPANS_FILTERED,
    SERVICE_NAMES,
    WORKFLOW_SPANS,
    SpanQuery,
    SpanReader,
    SpanReadError,
    render_names,
    render_spans,
)
from junjo_backend.store.base import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

PREFIX: Final = "/otel"
MAX_ID_CHARS: Final = 256
MAX_SERVICE_NAME_BYTES: Final = 1024
# Go stores ids as the hex of whatever bytes came, unchecked: any even-length hex is an id.
_HEX_ID: Final = re.compile(r"(?:[0-9a-fA-F]{2})*")
_JSON: Final = "application/json"


class SpanApiError(Exception):
    """An answer other than 200: HTTP status and the `error` text (never SQL, never a key)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); 0.0.0.0 is not one."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def access_note(settings: Settings) -> tuple[int, str]:
    """The start-up line (level, text) that says who may read the span routes and why."""
    host = settings.http_host
    if is_loopback_host(host):
        return logging.INFO, f"span API (/otel/...) open: HTTP_HOST={host} is loopback"
    if settings.span_api_token is None:
        closed = (
            f"span API (/otel/...) closed, it answers 403: HTTP_HOST={host} is not loopback and "
            "SPAN_API_TOKEN is not set (set it to allow `Authorization: Bearer <token>`)"
        )
        return logging.WARNING, closed
    bearer = (
        f"span API (/otel/...) needs `Authorization: Bearer <SPAN_API_TOKEN>`: HTTP_HOST={host} "
        "is not loopback"
    )
    return logging.INFO, bearer


def _access_check(settings: Settings) -> Callable[[Request], None]:
    """The dependency that enforces the access rule; decided once, from the settings."""
    if is_loopback_host(settings.http_host):

        def open_access(request: Request) -> None:  # noqa: ARG001 (FastAPI's signature)
            return

        return open_access
    token = settings.span_api_token
    expected = token.get_secret_value().encode() if token is not None else None

    def bearer_only(request: Request) -> None:
        if expected is None:
            raise SpanApiError(
                403,
                "the span API is closed: HTTP_HOST is not a loopback address and "
                "SPAN_API_TOKEN is not set",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise SpanApiError(
                401,
                "a valid `Authorization: Bearer <SPAN_API_TOKEN>` header is required",
                {"WWW-Authenticate": "Bearer"},
            )

    return bearer_only


def _span_id(name: str, value: str) -> str:
    if len(value) > MAX_ID_CHARS or not _HEX_ID.fullmatch(value):
        raise SpanApiError(
            400, f"{name}: expected hexadecimal digits in pairs, at most {MAX_ID_CHARS}"
        )
    return value.lower()  # ids are stored in lowercase


def _service_name(value: str) -> str:
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise SpanApiError(400, "serviceName: not valid UTF-8") from None
    if size > MAX_SERVICE_NAME_BYTES:
        raise SpanApiError(400, f"serviceName: longer than {MAX_SERVICE_NAME_BYTES} bytes")
    if "\x00" in value:
        # No stored text holds a NUL (Go cuts strings at the first one), and PostgreSQL
        # refuses it as a parameter.
        raise SpanApiError(400, "serviceName: contains a NUL character")
    return value


def install_span_api(
    app: FastAPI, settings: Settings, reader_of: Callable[[Request], SpanReader]
) -> None:
    """Mount the six routes on `app`, with `{"error": ...}` bodies under `/otel`."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(_access_check(settings))])

    async def answer(request: Request, query: SpanQuery, params: dict[str, str]) -> Response:
        try:
            rows = await reader_of(request).fetch(query, params)
        except StoreUnavailable as exc:
            raise SpanApiError(503, str(exc)) from exc
        except SpanReadError as exc:
            raise SpanApiError(500, str(exc)) from exc
        body = render_names(rows) if query.names_only else render_spans(rows)
        return Response(body, media_type=_JSON)

    @router.get("/span-service-names")
    async def span_service_names(request: Request) -> Response:
        """Distinct service names, in bytewise order."""
        return await answer(request, SERVICE_NAMES, {})

    @router.get("/service/{serviceName}/root-spans")
    async def root_spans(request: Request, serviceName: str) -> Response:  # noqa: N803 (Go's name)
        """The service's root spans, newest first, at most 500."""
        return await answer(request, ROOT_SPANS, {"service": _service_name(serviceName)})

    @router.get("/service/{serviceName}/root-spans-filtered")
    async def root_spans_filtered(request: Request, serviceName: str) -> Response:  # noqa: N803
        """Root spans of traces holding an LLM span, newest first, at most 500."""
        return await answer(request, ROOT_SPANS_FILTERED, {"service": _service_name(serviceName)})

    @router.get("/trace/{traceId}/nested-spans")
    async def nested_spans(request: Request, traceId: str) -> Response:  # noqa: N803
        """Every span of the trace, newest first (`[]` for an unknown trace)."""
        return await answer(request, NESTED_SPANS, {"trace": _span_id("traceId", traceId)})

    @router.get("/trace/{traceId}/span/{spanId}")
    async def one_span(request: Request, traceId: str, spanId: str) -> Response:  # noqa: N803
        """The one span, as a one-row array."""
        params = {"trace": _span_id("traceId", traceId), "span": _span_id("spanId", spanId)}
        return await answer(request, ONE_SPAN, params)

    @router.get("/spans/type/workflow/{serviceName}")
    async def workflow_spans(request: Request, serviceName: str) -> Response:  # noqa: N803
        """The service's workflow spans, newest first, no limit."""
        return await answer(request, WORKFLOW_SPANS, {"service": _service_name(serviceName)})

    app.include_router(router)
    app.add_exception_handler(SpanApiError, _span_api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _span_api_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, SpanApiError):  # pragma: no cover - registered for SpanApiError
        raise exc
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """The router's own errors (404, 405): `{"error": ...}` under `/otel`, FastAPI's elsewhere."""
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for it
        raise exc
    if request.url.path.startswith(PREFIX + "/"):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)
    return await http_exception_handler(request, exc)
