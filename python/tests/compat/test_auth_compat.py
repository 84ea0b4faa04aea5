"""The Go peer validates API keys against our Python AuthServer, over the real wire."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export import SpanExportResult

from junjo_backend.ingestion.client import IngestionClient

from .otlp_spans import as_sent, export, make_spans
from .wire import export_metrics_and_logs, export_traces, list_services

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from harness.peer import PeerPorts

    from .auth_backend import AuthBackend
    from .peer import PeerContainer, PeerFleet

pytestmark = pytest.mark.compat

UNKNOWN_KEY = "x" * 64  # well-formed, never issued


def a_request(tag: str) -> trace_service_pb2.ExportTraceServiceRequest:
    return encode_spans(make_spans(tag))


async def wal_contents(peer: PeerContainer, backend: AuthBackend) -> list[bytes]:
    async with IngestionClient(peer.internal_address, settings=backend.settings) as client:
        return [record.span_bytes for record in await client.read_spans(None, 10_000)]


async def test_a_key_from_our_database_is_accepted_and_its_spans_stored(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    key = await auth_backend.create_key("compat: valid key")
    peer = await peers.launch(peer_ports)
    spans = make_spans("valid")

    assert await export(spans, f"http://{peer.public_address}", key) is SpanExportResult.SUCCESS

    sent = [sent.span.SerializeToString() for sent in as_sent(spans)]
    assert await wal_contents(peer, auth_backend) == sent
    assert key not in peer.logs()


async def test_an_unknown_key_is_unauthenticated(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    await auth_backend.create_key("compat: some other key")
    peer = await peers.launch(peer_ports)

    outcome = await export_traces(peer.public_address, a_request("unknown"), UNKNOWN_KEY)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
    # Invalid keys are not cached by the peer: the second call reaches our server again.
    outcome = await export_traces(peer.public_address, a_request("unknown"), UNKNOWN_KEY)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
    assert (
        await export(make_spans("unknown"), f"http://{peer.public_address}", UNKNOWN_KEY)
        is SpanExportResult.FAILURE
    )
    assert await wal_contents(peer, auth_backend) == []
    assert UNKNOWN_KEY not in peer.logs()


async def test_a_missing_key_is_unauthenticated(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    peer = await peers.launch(peer_ports)

    outcome = await export_traces(peer.public_address, a_request("missing"), api_key=None)
    assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
    assert (
        await export(make_spans("missing"), f"http://{peer.public_address}", api_key=None)
        is SpanExportResult.FAILURE
    )
    assert await wal_contents(peer, auth_backend) == []


async def test_metrics_and_logs_need_a_key_and_are_accepted_with_one(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    key = await auth_backend.create_key("compat: metrics and logs")
    peer = await peers.launch(peer_ports)

    outcomes = await export_metrics_and_logs(peer.public_address, key)
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK, grpc.StatusCode.OK]
    outcomes = await export_metrics_and_logs(peer.public_address, None)
    assert [o.code for o in outcomes] == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert await wal_contents(peer, auth_backend) == []


async def test_both_servers_offer_reflection(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    del auth_backend  # serving, so that the peer serves
    peer = await peers.launch(peer_ports)

    assert {
        "opentelemetry.proto.collector.trace.v1.TraceService",
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
        "opentelemetry.proto.collector.logs.v1.LogsService",
    } <= await list_services(peer.public_address)
    assert {"ingestion.InternalIngestionService", "grpc.health.v1.Health"} <= await list_services(
        peer.internal_address
    )


async def test_the_peer_serves_only_once_our_server_answers_its_readiness_check(
    idle_auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    key = await idle_auth_backend.create_key("compat: readiness")
    peer = await peers.launch(peer_ports, wait=False)

    # Our server is not up: the peer waits without a deadline and serves nothing meanwhile.
    for _ in range(10):
        outcome = await export_traces(peer.public_address, a_request("early"), key, timeout=0.5)
        assert outcome.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert await peer.running()
        await asyncio.sleep(0.1)

    # Our server, with no key matching "startup-readiness-check", answers it; the peer serves.
    await idle_auth_backend.start()
    await peer.wait_serving()
    assert (await export_traces(peer.public_address, a_request("ready"), key)).code is (
        grpc.StatusCode.OK
    )


async def test_our_server_down_is_an_error_and_the_peer_recovers_when_it_returns(
    auth_backend: AuthBackend, peers: PeerFleet, peer_ports: PeerPorts
) -> None:
    cached_key = await auth_backend.create_key("compat: used before the outage")
    peer = await peers.launch(peer_ports)
    assert (await export_traces(peer.public_address, a_request("before"), cached_key)).code is (
        grpc.StatusCode.OK
    )

    await auth_backend.stop()
    new_key = await auth_backend.create_key("compat: issued during the outage")

    # A key the peer must ask about: after its 5 s WaitForReady deadline, INTERNAL.
    outcome = await export_traces(peer.public_address, a_request("down"), new_key)
    assert (outcome.code, outcome.details) == (
        grpc.StatusCode.INTERNAL,
        "failed to validate API key",
    )
    # A key validated before the outage is still in the peer's cache of valid keys.
    assert (await export_traces(peer.public_address, a_request("cached"), cached_key)).code is (
        grpc.StatusCode.OK
    )

    await auth_backend.start()  # same port
    # The peer's channel reconnects with its own backoff; a call that still finds no
    # connection within its 5 s deadline fails the same way, so allow a few.
    outcomes = [await export_traces(peer.public_address, a_request("after"), new_key)]
    while outcomes[-1].code is not grpc.StatusCode.OK and len(outcomes) < 6:
        outcomes.append(await export_traces(peer.public_address, a_request("after"), new_key))
    assert outcomes[-1].code is grpc.StatusCode.OK, outcomes
    assert all(o.code is grpc.StatusCode.INTERNAL for o in outcomes[:-1]), outcomes
    outcome = await export_traces(peer.public_address, a_request("after"), UNKNOWN_KEY)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
