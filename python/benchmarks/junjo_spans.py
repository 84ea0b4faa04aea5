"""Spans shaped like the Junjo SDK's, as WAL records: for the store benchmarks.

A workflow span per `nodes_per_workflow` node spans. Node spans carry the SDK's junjo.*
attributes and one or two `set_state` events whose JSON patch is a couple of hundred
bytes; workflow spans carry their start and end state (a few hundred bytes of JSON each)
and a graph structure. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from junjo_backend.ingestion.spans import SpanRecord

if TYPE_CHECKING:
    from collections.abc import Iterator

START_NS = 1_700_000_000_000_000_000
KEY_MS = 1_700_000_000_000


def _kv(key: str, value: str | float | bool) -> common_pb2.KeyValue:  # noqa: FBT001
    if isinstance(value, bool):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(bool_value=value))
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    if isinstance(value, float):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(double_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _state(rng: random.Random, index: int) -> str:
    state = {
        "messages": [f"message {index}-{i}: " + "x" * rng.randint(10, 40) for i in range(3)],
        "counter": index,
        "score": round(rng.random(), 6),
        "done": index % 2 == 0,
        "user": {"id": f"user-{index % 97}", "name": "Ada <ada@example.com>"},
    }
    return json.dumps(state)


def resource(service: str) -> bytes:
    """A resource with the SDK's usual attributes."""
    return resource_pb2.Resource(
        attributes=[
            _kv("service.name", service),
            _kv("telemetry.sdk.language", "python"),
            _kv("telemetry.sdk.name", "opentelemetry"),
            _kv("telemetry.sdk.version", "1.38.0"),
        ]
    ).SerializeToString()


def _node(rng: random.Random, index: int, trace: bytes, parent: bytes) -> trace_pb2.Span:
    start = START_NS + index * 1_000_000
    patch = json.dumps(
        [
            {"op": "replace", "path": "/counter", "value": index},
            {"op": "add", "path": "/messages/-", "value": "reply " + "y" * rng.randint(40, 120)},
        ]
    )
    events = [
        trace_pb2.Span.Event(
            time_unix_nano=start + 500_000 + e,
            name="set_state",
            attributes=[
                _kv("id", f"evt-{index}-{e}"),
                _kv("junjo.store.name", "WorkflowStore"),
                _kv("junjo.store.id", f"store-{index // 8}"),
                _kv("junjo.store.action", "set_messages"),
                _kv("junjo.state_json_patch", patch),
            ],
        )
        for e in range(1 + index % 2)
    ]
    return trace_pb2.Span(
        trace_id=trace,
        span_id=index.to_bytes(8, "big"),
        parent_span_id=parent,
        name=f"node-{index % 8}",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 900_000,
        attributes=[
            _kv("junjo.span_type", "node"),
            _kv("junjo.id", f"node-{index}"),
            _kv("junjo.parent_id", f"wf-{index // 8}"),
            _kv("junjo.workflow_id", f"wf-{index // 8}"),
            _kv("code.function", "service"),
            _kv("llm.token_count.total", rng.randint(100, 4000)),
        ],
        events=events,
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK),
    )


def _workflow(rng: random.Random, index: int, trace: bytes) -> trace_pb2.Span:
    start = START_NS + index * 1_000_000
    graph = json.dumps({"nodes": [{"id": f"n{i}", "label": f"node-{i}"} for i in range(8)]})
    return trace_pb2.Span(
        trace_id=trace,
        span_id=index.to_bytes(8, "big"),
        name="workflow",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 9_000_000,
        attributes=[
            _kv("junjo.span_type", "workflow"),
            _kv("junjo.id", f"wf-{index // 8}"),
            _kv("junjo.parent_id", ""),
            _kv("junjo.workflow.state.start", _state(rng, index)),
            _kv("junjo.workflow.state.end", _state(rng, index + 1)),
            _kv("junjo.workflow.graph_structure", graph),
            _kv("junjo.workflow.store.id", f"store-{index // 8}"),
            _kv("junjo.workflow.node.count", 8),
        ],
    )


def junjo_records(count: int, *, seed: int = 1, services: int = 3) -> Iterator[SpanRecord]:
    """`count` records in key order: per trace, one workflow span then its node spans."""
    rng = random.Random(seed)  # noqa: S311 (test data)
    resources = [resource(f"junjo-app-{i}") for i in range(services)]
    workflow = b""
    for index in range(count):
        trace = (index // 9 + 1).to_bytes(16, "big")
        if index % 9 == 0:
            span = _workflow(rng, index, trace)
            workflow = span.span_id
        else:
            span = _node(rng, index, trace, workflow)
        key = KEY_MS.to_bytes(6, "big") + index.to_bytes(10, "big")
        yield SpanRecord(key, span.SerializeToString(), resources[index // 9 % services])
