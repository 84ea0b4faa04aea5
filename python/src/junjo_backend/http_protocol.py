"""uvicorn's HTTP/1.1 protocol with the bounds it lacks: a request-head deadline, a connection cap.

uvicorn arms its keep-alive timer only after a response, so a connection that never
completes a first request head (idle, or trickling header bytes: slow-loris) stays open
for as long as the client likes, and each one holds a file descriptor and a buffer.
`BoundedH11Protocol` gives every connection `header_timeout` seconds, from its opening or
from the end of the previous response, to deliver a complete request head (and the body,
for the rare request that has one), and closes connections accepted beyond
`max_connections`. The fault suite's slow-loris scenario measures both
(tests/faults/test_http_slowloris.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from junjo_backend.logs import LogRateLimit

if TYPE_CHECKING:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

log = logging.getLogger(__name__)

# The client still owes us (part of) a request in these states.
_AWAITING_REQUEST = (h11.IDLE, h11.SEND_BODY)


# Connections refused over the cap: one warning at most this often, counting them all.
_REFUSALS_LOGGED_EVERY_SECONDS = 10.0


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with a request-head deadline and a connection cap (class attributes)."""

    header_timeout: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1000
    refusals: ClassVar[LogRateLimit] = LogRateLimit(_REFUSALS_LOGGED_EVERY_SECONDS)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """As H11Protocol; no deadline runs until the connection is made."""
        super().__init__(config, server_state, app_state, _loop)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection within the cap and start its first request-head deadline."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            left_out = self.refusals.admit()
            if left_out is not None:
                log.warning(
                    "too many HTTP connections: refusing new ones",
                    extra={"http_max_connections": self.max_connections, "refused": left_out + 1},
                )
            transport.close()
            return
        self._follow_request_state()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline, then let uvicorn clean up."""
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as uvicorn does; the deadline stops once a whole request has arrived."""
        super().data_received(data)
        self._follow_request_state()

    def on_response_complete(self) -> None:
        """After a response, the next request head gets a fresh deadline."""
        super().on_response_complete()
        self._follow_request_state()

    def _follow_request_state(self) -> None:
        if self.transport.is_closing() or self.conn.their_state not in _AWAITING_REQUEST:
            self._cancel_head_deadline()
        elif self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _AWAITING_REQUEST:
            return
        log.debug(
            "closing an HTTP connection that did not complete a request in time",
            extra={"http_header_timeout_seconds": self.header_timeout},
        )
        self.transport.close()


def bounded_h11_protocol(header_timeout: float, max_connections: int) -> type[BoundedH11Protocol]:
    """A `BoundedH11Protocol` class with these bounds, for `uvicorn.Config(http=...)`."""

    class ConfiguredH11Protocol(BoundedH11Protocol):
        pass

    ConfiguredH11Protocol.header_timeout = header_timeout
    ConfiguredH11Protocol.max_connections = max_connections
    ConfiguredH11Protocol.refusals = LogRateLimit(_REFUSALS_LOGGED_EVERY_SECONDS)
    return ConfiguredH11Protocol
