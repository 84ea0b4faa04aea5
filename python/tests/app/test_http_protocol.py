"""The HTTP protocol's bounds: a request-head deadline and a connection cap.

uvicorn serves a tiny ASGI app on an ephemeral loopback port with `bounded_h11_protocol`
and a short deadline; the clients are raw asyncio streams, so a test can trickle bytes or
send none. The slow-loris scenario at scale is tests/faults/test_http_slowloris.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

from harness.waiting import wait_until
from junjo_backend.http_protocol import bounded_h11_protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

HEADER_TIMEOUT = 0.3
MAX_CONNECTIONS = 3
# Hang guard: far longer than HEADER_TIMEOUT, far shorter than forever.
GUARD = 10.0
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


async def _hello(scope: dict[str, Any], _receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[int]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _hello,
        lifespan="off",
        log_config=None,
        # Long, so that only the head deadline can close an idle connection here.
        timeout_keep_alive=60,
        http=bounded_h11_protocol(HEADER_TIMEOUT, MAX_CONNECTIONS),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await wait_until(lambda: server.started, limit=GUARD)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, GUARD)
        listener.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection before the guard (data read is dropped)."""
    try:
        async with asyncio.timeout(GUARD):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    """No request head within the deadline: closed."""
    async with _serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed(reader)
        writer.close()


async def test_a_trickled_request_head_is_closed() -> None:
    """Bytes keep coming but the head never completes: closed all the same."""
    async with _serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            for byte in b"GET / HTTP/1.1\r\nHost: test\r\n" + b"X-Slow: 1\r\n" * 500:
                writer.write(bytes([byte]))
                await asyncio.sleep(HEADER_TIMEOUT / 10)

        trickling = asyncio.create_task(trickle())
        assert await _closed(reader)
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickling
        writer.close()


async def test_a_head_in_pieces_within_the_deadline_is_answered_and_the_next_one_is_bounded() -> (
    None
):
    """A head split in pieces is served; after the response, idling is bounded again."""
    async with _serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in (REQUEST[:10], REQUEST[10:20], REQUEST[20:]):
            writer.write(piece)
            await asyncio.sleep(HEADER_TIMEOUT / 5)
        response = await asyncio.wait_for(reader.readuntil(b"hello"), GUARD)
        assert response.startswith(b"HTTP/1.1 200")
        assert await _closed(reader)  # keep-alive is 60 s: the head deadline closed it
        writer.close()


async def test_connections_over_the_cap_are_closed_at_once() -> None:
    """With the cap reached, a new connection is closed; the ones within it stay served."""
    async with _serving() as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(HEADER_TIMEOUT / 2):
            assert await reader.read(1) == b""
        first_reader, first_writer = held[0]
        first_writer.write(REQUEST)
        assert (await asyncio.wait_for(first_reader.readuntil(b"hello"), GUARD)).startswith(
            b"HTTP/1.1 200"
        )
        for _, held_writer in held:
            held_writer.close()
        writer.close()
