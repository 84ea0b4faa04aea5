"""The HTTP access log: one line per response, naming the route, never the path as sent.

A client can put anything in a URL, an API key among it (`/health?key=...`, `/<key>`), and
uvicorn's own access log writes the path and the query string as received. This one writes
a matched route by its template (`/health`), anything else as `unknown route`, never a query
string, and a method outside the standard ones as `OTHER`. Probes and scrapes (`/ping`,
`/health`, `/metrics`) are logged at DEBUG, or every probe would log a line at INFO.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("junjo_backend.http.access")

UNKNOWN_ROUTE = "unknown route"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
_QUIET_ROUTES = frozenset({"/ping", "/health", "/metrics"})


def route_template(scope: Scope) -> str:
    """The template of the route the request matched, or `UNKNOWN_ROUTE`.

    Starlette's router records the matched route in the scope (also on a method mismatch,
    which answers 405).
    """
    template = getattr(scope.get("route"), "path", None)
    return template if isinstance(template, str) and template else UNKNOWN_ROUTE


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class AccessLog:
    """ASGI middleware around the whole app, so that error answers (500) are logged too."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap `app`."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; log one line when its response starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_and_log(message: Message) -> None:
            if message["type"] == "http.response.start":
                _log_response(scope, int(message["status"]))
            await send(message)

        await self.app(scope, receive, send_and_log)


def _log_response(scope: Scope, status: int) -> None:
    route = route_template(scope)
    method = str(scope.get("method", ""))
    method = method if method in _METHODS else "OTHER"
    level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
    log.log(level, "%s %s %d", method, route, status, extra={"client": _client(scope)})
