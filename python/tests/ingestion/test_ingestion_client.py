"""IngestionClient against a real gRPC server (the in-process fake) with the contract's rules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING

import grpc
import pytest

from harness.waiting import wait_until
from junjo_backend.ingestion.client import MAX_BATCH_SIZE, IngestionClient
from junjo_backend.ingestion.errors import (
    IngestionClosedError,
    IngestionDeadlineError,
    IngestionError,
    IngestionMessageTooLargeError,
    IngestionUnavailableError,
)
from tests.app.backend_under_test import established_connections_to

from .fake_ingestion import (
    FakeIngestionServer,
    FakeIngestionService,
    FakeWal,
    make_span,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.settings import Settings


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ingestion-stream" and t.is_alive()]


async def collect(client: IngestionClient, start_key: bytes | None, batch_size: int) -> list[bytes]:
    return [
        record.key
        async for record in client.stream_spans(start_key, batch_size)  # closes on exhaustion
    ]


async def test_empty_wal_gives_nothing(client: IngestionClient) -> None:
    assert await client.read_spans(None, 100) == []
    assert await collect(client, None, 100) == []
    assert await client.read_spans(b"\x01" * 16, 100) == []


async def test_records_carry_the_wire_bytes(client: IngestionClient, wal: FakeWal) -> None:
    span = make_span("GET /a").SerializeToString()
    resource = b"\n\x1c\n\x0cservice.name\x12\x0c\n\nbilling-ui"
    key = wal.append(span, resource)

    [record] = await client.read_spans(None)

    assert (record.key, record.span_bytes, record.resource_bytes) == (key, span, resource)
    assert record.service_name == "billing-ui"
    assert record.span().name == "GET /a"


async def test_exact_batch_boundaries(client: IngestionClient, wal: FakeWal) -> None:
    keys = wal.seed(10)

    first = await client.read_spans(None, 5)
    second = await client.read_spans(first[-1].key, 5)
    third = await client.read_spans(second[-1].key, 5)

    assert [r.key for r in first] == keys[:5]
    assert [r.key for r in second] == keys[5:]
    assert third == []
    assert [r.key for r in await client.read_spans(None, 10)] == keys
    assert [r.key for r in await client.read_spans(None, 11)] == keys
    assert await client.read_spans(None, 0) == []
    assert [r.key for r in await client.read_spans(keys[-2], 1)] == keys[-1:]


async def test_reads_strictly_after_a_key_that_no_longer_exists(
    client: IngestionClient, wal: FakeWal
) -> None:
    keys = wal.seed(6)
    wal.remove(keys[2])

    records = await client.read_spans(keys[2], 100)

    assert [r.key for r in records] == keys[3:]


async def test_entries_the_server_cannot_decode_are_skipped_but_count(
    client: IngestionClient, wal: FakeWal
) -> None:
    good = wal.seed(2)
    broken = wal.append_value(b"\xff\xff\xff not a SpanDataContainer")
    more = wal.seed(2)

    first = await client.read_spans(None, 3)
    rest = await client.read_spans(first[-1].key, 100)

    assert [r.key for r in first] == good  # the broken entry used up the third slot
    assert [r.key for r in rest] == more
    assert broken not in [r.key for r in first + rest]


async def test_entries_whose_span_or_resource_does_not_decode_are_skipped_too(
    client: IngestionClient, wal: FakeWal
) -> None:
    good = wal.seed(1)
    wal.append(b"\xff\xff\xff", b"")  # the span does not decode
    wal.append(make_span("a").SerializeToString(), b"\x0a\x05\x0a\x03\xff\xfe\xfd")
    more = wal.seed(1)

    first = await client.read_spans(None, 3)
    everything = await client.read_spans(None, 100)

    # Both broken entries used up a slot of the first read, and neither is ever sent.
    assert [r.key for r in first] == good
    assert [r.key for r in everything] == good + more
    assert all(r.span().name and r.resource().attributes for r in everything)


async def test_stream_spans_yields_every_record_in_order(
    client: IngestionClient, wal: FakeWal
) -> None:
    keys = wal.seed(1500)

    assert await collect(client, None, 2000) == keys
    assert await collect(client, keys[99], 1000) == keys[100:1100]


async def test_server_restart_mid_stream_resumes_without_duplicates_or_gaps(
    client: IngestionClient,
    wal: FakeWal,
    ingestion_service: FakeIngestionService,
    ingestion_server: FakeIngestionServer,
) -> None:
    keys = wal.seed(2000)
    ingestion_service.pause_after = 700
    reading = asyncio.create_task(collect(client, None, 5000))
    await ingestion_service.paused.wait()

    await ingestion_server.restart()  # cuts the stream after 700 messages
    seen = await reading

    assert seen == keys
    first_call, *later_calls = ingestion_service.requests
    assert first_call == (b"", 5000)
    # The resumed call starts after the last key delivered and asks only for the rest.
    assert later_calls[-1] == (keys[699], 4300)


async def test_long_stream_that_outlives_its_deadline_is_resumed(
    make_settings: Callable[..., Settings],
    wal: FakeWal,
    ingestion_service: FakeIngestionService,
    ingestion_server: FakeIngestionServer,
) -> None:
    keys = wal.seed(300)
    # Every call sends 100 messages and then stalls until the client's deadline cuts it.
    ingestion_service.pause_after = 100
    # Long enough for a loaded machine to deliver a call's first message (a call that
    # delivers none ends the read), short enough to cut each stalled call soon.
    settings = make_settings(
        ingestion_grpc_address=ingestion_server.address, ingestion_call_timeout_seconds=1.0
    )
    async with IngestionClient(settings=settings) as client:
        assert await collect(client, None, 1000) == keys


async def test_server_that_never_answers_raises_a_deadline_error(
    make_settings: Callable[..., Settings],
    ingestion_service: FakeIngestionService,
    ingestion_server: FakeIngestionServer,
) -> None:
    ingestion_service.stall = True
    settings = make_settings(
        ingestion_grpc_address=ingestion_server.address, ingestion_call_timeout_seconds=0.2
    )
    async with IngestionClient(settings=settings) as client:
        with pytest.raises(IngestionDeadlineError) as raised:
            await client.read_spans(None, 10)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(ingestion_service.requests) == 1  # a deadline with no progress is not retried


async def test_message_over_the_size_limit_is_a_clear_error(
    make_settings: Callable[..., Settings], wal: FakeWal, ingestion_server: FakeIngestionServer
) -> None:
    wal.seed(3)
    wal.append(b"\x2a\x80\x80\x04" + b"a" * 65536, b"")  # a 64 KiB span name
    settings = make_settings(
        ingestion_grpc_address=ingestion_server.address, ingestion_max_message_bytes=32 * 1024
    )
    async with IngestionClient(settings=settings) as client:
        with pytest.raises(IngestionMessageTooLargeError) as raised:
            await client.read_spans(None, 10)
        # The entries before the big one are readable.
        assert len(await client.read_spans(None, 3)) == 3
    assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "INGESTION_MAX_MESSAGE_BYTES" in str(raised.value)


async def test_other_status_codes_raise_a_typed_error_with_the_code(
    client: IngestionClient, ingestion_service: FakeIngestionService
) -> None:
    ingestion_service.fail_with = grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(IngestionError) as raised:
        await client.read_spans(None, 10)

    assert type(raised.value) is IngestionError
    assert raised.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details == "injected by the test"
    assert len(ingestion_service.requests) == 1


async def test_unavailable_is_retried_until_the_retry_deadline(
    make_settings: Callable[..., Settings], free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for several attempts (the first retry waits up to 0.05 s) on a loaded machine.
    settings = make_settings(
        ingestion_grpc_address=f"127.0.0.1:{free_port}", ingestion_retry_deadline_seconds=1.0
    )
    caplog.set_level(logging.DEBUG, logger="junjo_backend.ingestion.client")
    async with IngestionClient(settings=settings) as client:
        with pytest.raises(IngestionUnavailableError) as raised:
            await client.read_spans(None, 10)
        assert client.reachable is False
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
    assert "INGESTION_RETRY_DEADLINE_SECONDS" in str(raised.value)
    # One line per outage at INFO; its retries only at DEBUG.
    retries = [
        r for r in caplog.records if r.getMessage() == "ingestion stream interrupted, resuming"
    ]
    assert len(retries) > 1
    assert [r.levelno for r in retries] == [logging.INFO] + [logging.DEBUG] * (len(retries) - 1)


async def test_a_server_that_comes_up_within_the_retry_deadline_is_read(
    make_settings: Callable[..., Settings], wal: FakeWal, free_port: int
) -> None:
    keys = wal.seed(5)
    service = FakeIngestionService(wal)
    server = FakeIngestionServer(service, port=free_port)
    settings = make_settings(ingestion_grpc_address=server.address)
    async with IngestionClient(settings=settings) as client:
        reading = asyncio.create_task(client.read_spans(None, 10))
        # Start the server only once the client has failed at least once.
        await wait_until(lambda: reading.done() or client.reachable is not None)
        await server.start()
        try:
            records = await reading
        finally:
            await server.stop()
    assert [r.key for r in records] == keys


async def test_wait_for_ready_waits_for_the_server_instead_of_failing(
    make_settings: Callable[..., Settings], wal: FakeWal, free_port: int
) -> None:
    keys = wal.seed(3)
    service = FakeIngestionService(wal)
    server = FakeIngestionServer(service, port=free_port)
    settings = make_settings(
        ingestion_grpc_address=server.address,
        ingestion_wait_for_ready=True,
        ingestion_retry_deadline_seconds=0.01,  # no retry could save a fail-fast call
    )
    async with IngestionClient(settings=settings) as client:
        reading = asyncio.create_task(client.read_spans(None, 10))
        await asyncio.sleep(0.2)
        await server.start()
        try:
            records = await reading
        finally:
            await server.stop()
    assert [r.key for r in records] == keys


async def test_check_connection(
    client: IngestionClient, make_settings: Callable[..., Settings], free_port: int
) -> None:
    assert await client.check_connection()
    assert client.reachable is True

    settings = make_settings(ingestion_grpc_address=f"127.0.0.1:{free_port}")
    unreachable = IngestionClient(settings=settings)
    assert not await unreachable.check_connection()  # not connected yet
    await unreachable.connect()
    assert not await unreachable.check_connection(timeout=0.2)
    assert unreachable.reachable is False
    assert unreachable.last_error is not None
    await unreachable.close()
    assert not await unreachable.check_connection()


async def test_close_is_idempotent_and_later_calls_fail_cleanly(settings: Settings) -> None:
    client = IngestionClient(settings=settings)
    with pytest.raises(RuntimeError, match="connect"):
        await client.read_spans(None)
    await client.close()  # never connected: nothing to do
    await client.connect()
    await client.connect()  # idempotent
    assert await client.read_spans(None) == []
    await client.close()
    await client.close()
    with pytest.raises(IngestionClosedError):
        await client.read_spans(None)
    await client.connect()  # a closed client can be opened again
    assert await client.read_spans(None) == []
    await client.close()


async def test_close_cancels_a_stream_blocked_in_the_server(
    client: IngestionClient, ingestion_service: FakeIngestionService
) -> None:
    ingestion_service.stall = True
    reading = asyncio.create_task(client.read_spans(None, 10))
    await wait_until(lambda: bool(ingestion_service.requests))

    await client.close()

    with pytest.raises(IngestionClosedError):
        await reading
    assert stream_threads() == []


async def test_close_interrupts_a_retry_backoff(
    make_settings: Callable[..., Settings], free_port: int
) -> None:
    settings = make_settings(
        ingestion_grpc_address=f"127.0.0.1:{free_port}", ingestion_retry_deadline_seconds=3600
    )
    client = IngestionClient(settings=settings)
    await client.connect()
    reading = asyncio.create_task(client.read_spans(None, 10))
    await wait_until(lambda: client.reachable is not None)  # the first failure

    await asyncio.wait_for(client.close(), timeout=30)

    with pytest.raises(IngestionClosedError):
        await asyncio.wait_for(reading, timeout=30)


async def test_leaving_a_stream_early_cancels_its_call(
    client: IngestionClient, wal: FakeWal
) -> None:
    keys = wal.seed(3000)
    taken: list[SpanRecord] = []
    async with contextlib.aclosing(client.stream_spans(None, 3000)) as records:
        async for record in records:
            taken.append(record)
            if len(taken) == 10:
                break

    await wait_until(lambda: not stream_threads())  # the worker notices at its next hand-off
    assert [r.key for r in taken] == keys[:10]
    assert [r.key for r in await client.read_spans(keys[9], 5)] == keys[10:15]


async def test_streams_left_early_leave_no_call_or_connection_behind(
    settings: Settings, ingestion_server: FakeIngestionServer, wal: FakeWal
) -> None:
    # grpcio's single-threaded stream does not poll a cancelled call's due events itself:
    # unpolled, the call lived on in grpc-core with its connection, past channel.close()
    # (ingestion_client._finish). The poller leaves a stream early at every settle window.
    wal.seed(3000)
    client = IngestionClient(settings=settings)
    await client.connect()
    try:
        for _ in range(20):
            chunks = client.stream_chunks(None, MAX_BATCH_SIZE)
            async with contextlib.aclosing(chunks):
                async for _chunk in chunks:
                    break
        await wait_until(lambda: not stream_threads())
        assert established_connections_to(ingestion_server.port) == 1  # one channel, reused
    finally:
        await client.close()
    await wait_until(lambda: established_connections_to(ingestion_server.port) == 0)


async def test_batch_size_must_fit_the_wire(client: IngestionClient) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        await client.read_spans(None, -1)
    with pytest.raises(ValueError, match="batch_size"):
        await client.read_spans(None, 2**32)
