"""An in-process `InternalIngestionService` with the Go ingestion-service's ReadSpans semantics.

For tests that need a real gRPC server without the Go peer. What it copies from the Go side
(see the team's shared CONTRACT.md): keys are 16-byte ULIDs from one monotonic generator; values
are serialized `SpanDataContainer`s; ReadSpans with an empty key starts at the oldest entry,
otherwise strictly after the given key (which need not exist); it streams at most
`batch_size` entries and ends with OK; it decodes every entry's container, span and
resource and sends the span and resource re-encoded, and an entry of which any part does
not decode is skipped (nothing is sent) but counts toward `batch_size`; `batch_size = 0`
streams nothing. Keys are allocated before entries are committed, so a test can commit an
entry behind newer ones (`reserve_key`, then `append(..., key=reserved)`), as concurrent
OTLP requests do on the Go side.

What it adds for tests: fault switches on `FakeIngestionService` (stall before the first
message, pause after N messages, fail with a status), and `FakeIngestionServer.restart()`
on the same port (or `stop()` and a later `start()`, which binds that port again).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from typing import TYPE_CHECKING, Self

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from junjo_backend._wire.ingestion import ingestion_pb2, ingestion_pb2_grpc
from junjo_backend._wire.span_data_container import span_data_container_pb2

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator


class UlidGenerator:
    """Monotonic ULIDs as the Go side makes them: same millisecond, random part plus one."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_random = 0

    def new(self, ms: int | None = None) -> bytes:
        """The next key; `ms` pins the timestamp (it never goes below the last one)."""
        now = int(time.time() * 1000) if ms is None else ms
        if now <= self._last_ms:
            now = self._last_ms
            self._last_random += 1
        else:
            self._last_random = int.from_bytes(os.urandom(10), "big") >> 1
        self._last_ms = now
        return now.to_bytes(6, "big") + self._last_random.to_bytes(10, "big")


def make_resource(service: str | None, **attributes: str) -> resource_pb2.Resource:
    """A resource with `service.name` (when given) and more string attributes."""
    pairs = dict(attributes)
    if service is not None:
        pairs["service.name"] = service
    return resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
            for key, value in pairs.items()
        ]
    )


def make_span(
    name: str,
    *,
    start_unix_nano: int = 1_700_000_000_000_000_000,
    duration_nanos: int = 1_500_000,
    trace_id: bytes | None = None,
    span_id: bytes | None = None,
) -> trace_pb2.Span:
    """A server span with random ids (unless given) and a few attributes."""
    return trace_pb2.Span(
        trace_id=trace_id or os.urandom(16),
        span_id=span_id or os.urandom(8),
        name=name,
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start_unix_nano,
        end_time_unix_nano=start_unix_nano + duration_nanos,
        attributes=[
            common_pb2.KeyValue(key="http.route", value=common_pb2.AnyValue(string_value=name)),
            common_pb2.KeyValue(key="http.status_code", value=common_pb2.AnyValue(int_value=200)),
        ],
    )


class FakeWal:
    """The WAL: entries in key order, values as the Go side stores them."""

    def __init__(self) -> None:
        self._keys: list[bytes] = []
        self._values: list[bytes] = []
        self._ulids = UlidGenerator()
        self._reserved: set[bytes] = set()

    def reserve_key(self, ms: int | None = None) -> bytes:
        """Allocate a key now for an entry committed later (possibly behind newer keys)."""
        key = self._ulids.new(ms)
        self._reserved.add(key)
        return key

    def append(
        self,
        span_bytes: bytes,
        resource_bytes: bytes,
        *,
        key: bytes | None = None,
        ms: int | None = None,
    ) -> bytes:
        """Store one span with its resource; returns its key (stamped `ms` when given)."""
        value = span_data_container_pb2.SpanDataContainer(
            span_bytes=span_bytes, resource_bytes=resource_bytes
        ).SerializeToString()
        return self.append_value(value, key=key, ms=ms)

    def append_value(
        self, value: bytes, *, key: bytes | None = None, ms: int | None = None
    ) -> bytes:
        """Store a raw WAL value (which may not decode as a SpanDataContainer)."""
        key = key or self._ulids.new(ms)
        if self._keys and key <= self._keys[-1]:
            if key not in self._reserved:
                raise ValueError("WAL keys only grow (reserve_key() for a late commit)")
            self._reserved.discard(key)
            index = bisect.bisect_left(self._keys, key)
            self._keys.insert(index, key)
            self._values.insert(index, value)
            return key
        self._reserved.discard(key)
        self._keys.append(key)
        self._values.append(value)
        return key

    def seed(self, count: int, *, services: int = 3, ms: int | None = None) -> list[bytes]:
        """Store `count` spans spread over `services` services; returns their keys."""
        resources = [
            make_resource(f"service-{n}").SerializeToString() for n in range(max(1, services))
        ]
        span = make_span("GET /things/{id}").SerializeToString()
        return [
            self.append(span, resources[n % len(resources)], key=self._ulids.new(ms))
            for n in range(count)
        ]

    def remove(self, key: bytes) -> None:
        """Delete an entry (as WAL garbage collection would)."""
        index = bisect.bisect_left(self._keys, key)
        if index == len(self._keys) or self._keys[index] != key:
            raise KeyError(key.hex())
        del self._keys[index]
        del self._values[index]

    @property
    def keys(self) -> list[bytes]:
        """Every key, oldest first."""
        return list(self._keys)

    def read(self, start_key: bytes, batch_size: int) -> Iterator[ingestion_pb2.ReadSpansResponse]:
        """ReadSpans as the Go side answers it."""
        index = bisect.bisect_right(self._keys, start_key) if start_key else 0
        for counted, position in enumerate(range(index, len(self._keys))):
            if counted >= batch_size:
                return
            try:
                container = span_data_container_pb2.SpanDataContainer.FromString(
                    self._values[position]
                )
                span = trace_pb2.Span.FromString(container.span_bytes)
                resource = resource_pb2.Resource.FromString(container.resource_bytes)
            except DecodeError:
                continue  # skipped, but it counted toward batch_size
            yield ingestion_pb2.ReadSpansResponse(
                key_ulid=self._keys[position],
                span_bytes=span.SerializeToString(),
                resource_bytes=resource.SerializeToString(),
            )


class FakeIngestionService(ingestion_pb2_grpc.InternalIngestionServiceServicer):
    """ReadSpans over a `FakeWal`, with switches for faults that a test cannot otherwise cause."""

    def __init__(self, wal: FakeWal) -> None:
        self.wal = wal
        self.requests: list[tuple[bytes, int]] = []
        # Never send anything (the call then ends on the client's deadline).
        self.stall = False
        # After this many messages of a call, stop sending and wait, as a server that is about
        # to be killed would; `paused` is set when it gets there.
        self.pause_after: int | None = None
        self.paused = asyncio.Event()
        # Answer every call with this status (and no data).
        self.fail_with: grpc.StatusCode | None = None

    async def ReadSpans(
        self,
        request: ingestion_pb2.ReadSpansRequest,
        context: grpc.aio.ServicerContext[
            ingestion_pb2.ReadSpansRequest, ingestion_pb2.ReadSpansResponse
        ],
    ) -> AsyncIterator[ingestion_pb2.ReadSpansResponse]:
        """Stream the entries after `start_key_ulid`, at most `batch_size` of them."""
        self.requests.append((request.start_key_ulid, request.batch_size))
        if self.fail_with is not None:
            await context.abort(self.fail_with, "injected by the test")
        if self.stall:
            await asyncio.Event().wait()
        for sent, response in enumerate(self.wal.read(request.start_key_ulid, request.batch_size)):
            if self.pause_after is not None and sent >= self.pause_after:
                self.paused.set()
                await asyncio.Event().wait()
            yield response


class FakeIngestionServer:
    """A `grpc.aio` server for `FakeIngestionService` on 127.0.0.1, port 0 unless told."""

    def __init__(self, service: FakeIngestionService, *, port: int = 0) -> None:
        self.service = service
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Bind and serve (the same port again after a restart)."""
        server = grpc.aio.server()
        ingestion_pb2_grpc.add_InternalIngestionServiceServicer_to_server(self.service, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; calls under way are cut when `grace` runs out (at once for None)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def restart(self) -> None:
        """Cut every call at once and serve again on the same port."""
        await self.stop()
        self.service.pause_after = None
        self.service.paused = asyncio.Event()
        await self.start()

    async def __aenter__(self) -> Self:
        """Start serving for the `async with` block."""
        await self.start()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        """Stop serving at once, however the block ended."""
        await self.stop()
