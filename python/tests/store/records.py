"""Small hand-made WAL records for the store tests."""

from __future__ import annotations

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from junjo_backend.ingestion.spans import SpanRecord

RESOURCE = resource_pb2.Resource(
    attributes=[
        common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value="svc"))
    ]
).SerializeToString()


def key(n: int) -> bytes:
    """A 16-byte WAL key that sorts by `n`."""
    return (1_700_000_000_000).to_bytes(6, "big") + n.to_bytes(10, "big")


def record(
    n: int,
    *,
    span_n: int | None = None,
    attributes: list[common_pb2.KeyValue] | None = None,
    events: list[trace_pb2.Span.Event] | None = None,
    padding: int = 0,
) -> SpanRecord:
    """Record `n` (key `key(n)`) of a span whose ids derive from `span_n` (default `n`)."""
    ids = n if span_n is None else span_n
    span = trace_pb2.Span(
        trace_id=ids.to_bytes(16, "big"),
        span_id=ids.to_bytes(8, "big"),
        name="s" + "x" * padding,
        start_time_unix_nano=1_700_000_000_000_000_000 + n,
        end_time_unix_nano=1_700_000_000_000_001_000 + n,
        attributes=attributes or [],
        events=events or [],
    )
    return SpanRecord(key(n), span.SerializeToString(), RESOURCE)


def set_state(patch: str) -> trace_pb2.Span.Event:
    """A `set_state` event carrying `patch`."""
    value = common_pb2.AnyValue(string_value=patch)
    return trace_pb2.Span.Event(
        name="set_state",
        attributes=[common_pb2.KeyValue(key="junjo.state_json_patch", value=value)],
    )
