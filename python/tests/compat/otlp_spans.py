"""Spans made by the OpenTelemetry SDK and sent by the real OTLP gRPC exporter."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan

API_KEY_HEADER = "x-junjo-api-key"


@dataclass(frozen=True, slots=True)
class SentSpan:
    """One span as the exporter encoded it, with its resource."""

    span: trace_pb2.Span
    resource: resource_pb2.Resource


def make_spans(tag: str) -> list[ReadableSpan]:
    """Spans from two services that use every field the SDK can set: nesting, every kind,
    attributes of each type, events, links, error status, trace state."""
    spans: list[ReadableSpan] = []
    for service in ("compat-checkout", "compat-inventory"):
        recorder = InMemorySpanExporter()
        provider = TracerProvider(
            resource=Resource.create({"service.name": service, "deployment.environment": tag})
        )
        provider.add_span_processor(SimpleSpanProcessor(recorder))
        tracer = provider.get_tracer("compat.suite", "1.0.0")
        with tracer.start_as_current_span(f"{tag}-{service}-root", kind=SpanKind.SERVER) as root:
            root.set_attribute("http.route", "/orders/{id}")
            root.set_attribute("http.status_code", 503)
            root.set_attribute("retry.ratio", 0.25)
            root.set_attribute("cache.hit", value=False)
            root.set_attribute("order.items", ["apple", "pear", "fig"])
            root.set_attribute("order.quantities", [3, 1, 4])
            root.add_event("order.received", {"order.id": "o-1", "bytes": 1234})
            for kind in (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.INTERNAL):
                with tracer.start_as_current_span(
                    f"{tag}-{service}-{kind.name.lower()}",
                    kind=kind,
                    links=[Link(root.get_span_context(), {"link.reason": "follows"})],
                ) as child:
                    child.set_attribute("unicode.text", "naïve café ✓")
            root.set_status(Status(StatusCode.ERROR, "inventory service unavailable"))
        provider.shutdown()
        spans.extend(recorder.get_finished_spans())
    return spans


def as_sent(spans: Sequence[ReadableSpan]) -> list[SentSpan]:
    """The exporter's own encoding of `spans`, flattened in the order of the request."""
    request = encode_spans(spans)
    return [
        SentSpan(span, resource_spans.resource)
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


async def export(
    spans: Sequence[ReadableSpan], endpoint: str, api_key: str | None
) -> SpanExportResult:
    """Send `spans` with the real OTLPSpanExporter, insecure, with the key header when given.

    The exporter blocks, so it runs on a thread: the event loop must stay free to answer
    the peer's ValidateApiKey call that this very export causes.
    """
    headers = {API_KEY_HEADER: api_key} if api_key is not None else None
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, headers=headers, timeout=10)
    try:
        return await asyncio.to_thread(exporter.export, spans)
    finally:
        await asyncio.to_thread(exporter.shutdown)


def bulk_request(
    first: int, count: int, service: str
) -> trace_service_pb2.ExportTraceServiceRequest:
    """`count` small spans of one service, numbered from `first`: cheap to make in thousands."""
    resource = resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))
        ]
    )
    trace_id = os.urandom(16)
    spans = [
        trace_pb2.Span(
            trace_id=trace_id,
            span_id=os.urandom(8),
            name=f"bulk-{number}",
            kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=1_700_000_000_000_000_000 + number,
            end_time_unix_nano=1_700_000_000_000_000_000 + number + 1000,
        )
        for number in range(first, first + count)
    ]
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource, scope_spans=[trace_pb2.ScopeSpans(spans=spans)]
            )
        ]
    )
