"""Our IngestionClient reads what the real OTLP exporter sent through the Go peer.

One peer and one set of exported spans serve the whole module: reading does not change the WAL.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export import SpanExportResult

from harness.peer import PeerImage, PeerPorts
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.ingestion.spans import ULID_BYTES, SpanRecord, ulid_millis

from .auth_backend import AuthBackend
from .otlp_spans import SentSpan, as_sent, export, make_spans
from .peer import PeerContainer, PeerFleet, peer_registry
from .wire import read_spans_raw

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from junjo_backend.settings import Settings

pytestmark = [pytest.mark.compat, pytest.mark.asyncio(loop_scope="module")]

EXPORTS = 3  # separate Export calls, each with spans from two services


@dataclass(frozen=True, slots=True)
class Exported:
    """What the exporter sent through the peer, and when."""

    peer: PeerContainer
    settings: Settings
    sent: list[SentSpan]
    first_sent_ms: int  # before the first export began
    last_sent_ms: int  # after the last export returned


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def exported(
    request: pytest.FixtureRequest,
    peer_image: PeerImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Exported]:
    folder = tmp_path_factory.mktemp("ingestion-compat")
    ports = PeerPorts.pick(peer_image)
    backend = AuthBackend(folder / "junjo.db", ports.backend)
    fleet = PeerFleet(peer_image, folder, peer_registry(request.node))
    try:
        await backend.open()
        await backend.start()
        key = await backend.create_key("compat: ingestion")
        peer = await fleet.launch(ports)
        sent: list[SentSpan] = []
        first_sent_ms = time.time_ns() // 1_000_000
        for number in range(EXPORTS):
            spans = make_spans(f"export-{number}")
            result = await export(spans, f"http://{peer.public_address}", key)
            assert result is SpanExportResult.SUCCESS
            sent.extend(as_sent(spans))
        last_sent_ms = -(-time.time_ns() // 1_000_000)
        yield Exported(peer, backend.settings, sent, first_sent_ms, last_sent_ms)
    finally:
        await fleet.close()
        await backend.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(exported: Exported) -> AsyncIterator[IngestionClient]:
    async with IngestionClient(exported.peer.internal_address, settings=exported.settings) as c:
        yield c


async def everything(client: IngestionClient, exported: Exported) -> list[SpanRecord]:
    records = await client.read_spans(None, len(exported.sent) + 100)
    assert len(records) == len(exported.sent)
    return records


def key_between(low: bytes, high: bytes) -> bytes:
    """A 16-byte key strictly between two WAL keys, so one that is not in the WAL."""
    candidate = (int.from_bytes(low, "big") + 1).to_bytes(ULID_BYTES, "big")
    if candidate >= high:
        pytest.skip("adjacent ULIDs: no key between them (a one in 2^32 draw)")
    return candidate


async def test_spans_arrive_byte_exact_in_the_order_sent(
    client: IngestionClient, exported: Exported
) -> None:
    records = await everything(client, exported)

    # The peer re-encodes what it stored: span_bytes is the canonical encoding of the Span
    # the exporter sent, which for these messages is what protobuf-python writes too.
    assert [r.span_bytes for r in records] == [s.span.SerializeToString() for s in exported.sent]
    assert [r.resource_bytes for r in records] == [
        s.resource.SerializeToString() for s in exported.sent
    ]
    assert [r.span() for r in records] == [s.span for s in exported.sent]
    assert [r.resource() for r in records] == [s.resource for s in exported.sent]


async def test_keys_are_increasing_ulids_stamped_when_the_peer_received_the_span(
    client: IngestionClient, exported: Exported
) -> None:
    keys = [r.key for r in await everything(client, exported)]

    assert all(len(key) == ULID_BYTES for key in keys)
    assert keys == sorted(set(keys))
    assert exported.first_sent_ms <= ulid_millis(keys[0])
    assert ulid_millis(keys[-1]) <= exported.last_sent_ms


async def test_records_name_their_service(client: IngestionClient, exported: Exported) -> None:
    records = await everything(client, exported)
    assert [r.service_name for r in records] == [
        next(a.value.string_value for a in s.resource.attributes if a.key == "service.name")
        for s in exported.sent
    ]
    assert {r.service_name for r in records} == {"compat-checkout", "compat-inventory"}


async def test_batch_size_edges(client: IngestionClient, exported: Exported) -> None:
    records = await everything(client, exported)
    count = len(records)

    assert await client.read_spans(None, 1) == records[:1]
    assert await client.read_spans(None, count) == records
    assert await client.read_spans(None, count + 1) == records
    assert await client.read_spans(records[0].key, count - 1) == records[1:]
    assert await client.read_spans(records[0].key, count) == records[1:]
    # Batch size 0: our client does not even call; the peer, asked directly, streams
    # nothing and ends with OK, from the start and from a key.
    assert await client.read_spans(None, 0) == []
    for start in (b"", records[3].key):
        messages, code = await read_spans_raw(exported.peer.internal_address, start, 0)
        assert (messages, code) == ([], grpc.StatusCode.OK)
    messages, code = await read_spans_raw(exported.peer.internal_address, b"", 2)
    assert code is grpc.StatusCode.OK
    assert [m.key_ulid for m in messages] == [r.key for r in records[:2]]


async def test_reading_resumes_strictly_after_the_given_key(
    client: IngestionClient, exported: Exported
) -> None:
    records = await everything(client, exported)

    for index in (0, 1, len(records) // 2, len(records) - 2, len(records) - 1):
        assert await client.read_spans(records[index].key, 1000) == records[index + 1 :]
    # Batch after batch, each from the last key of the one before: no gap, no repeat.
    drained: list[SpanRecord] = []
    last_key: bytes | None = None
    while batch := await client.read_spans(last_key, 7):
        drained.extend(batch)
        last_key = batch[-1].key
    assert drained == records


async def test_a_start_key_that_is_not_in_the_wal(
    client: IngestionClient, exported: Exported
) -> None:
    records = await everything(client, exported)
    middle = len(records) // 2

    gone = key_between(records[middle].key, records[middle + 1].key)
    assert await client.read_spans(gone, 1000) == records[middle + 1 :]
    assert await client.read_spans(bytes(ULID_BYTES), 1000) == records  # older than every key
    assert await client.read_spans(b"\xff" * ULID_BYTES, 1000) == []  # newer than every key
    future = (exported.last_sent_ms + 3_600_000).to_bytes(6, "big") + bytes(10)
    assert await client.read_spans(future, 1000) == []


async def test_streaming_yields_the_same_records(
    client: IngestionClient, exported: Exported
) -> None:
    records = await everything(client, exported)

    streamed = [r async for r in client.stream_spans(None, len(records) + 1)]
    assert streamed == records
    # Closing a stream early leaves the client usable.
    async with contextlib.aclosing(client.stream_spans(records[2].key, 1000)) as stream:
        first = await anext(stream)
    assert first == records[3]
    assert await client.read_spans(records[-2].key, 10) == records[-1:]
