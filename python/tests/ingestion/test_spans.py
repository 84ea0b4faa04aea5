"""SpanRecord, its decoding helpers, and the mapping of gRPC statuses to typed errors."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2

from junjo_backend.ingestion.errors import (
    IngestionDeadlineError,
    IngestionError,
    IngestionMessageTooLargeError,
    IngestionUnavailableError,
    ingestion_error,
    is_connection_loss,
    rpc_status,
)
from junjo_backend.ingestion.spans import (
    NO_SERVICE_NAME,
    ResourceCatalog,
    SpanRecord,
    service_name_of,
    ulid_millis,
    ulid_time,
)

from .fake_ingestion import UlidGenerator, make_resource, make_span

KEY = UlidGenerator().new(ms=1_717_171_717_123)


def record(span: bytes = b"", resource: bytes = b"") -> SpanRecord:
    return SpanRecord(KEY, span, resource)


def test_record_decodes_its_span_and_resource() -> None:
    span = make_span("GET /x")
    resource = make_resource("api", region="eu")
    decoded = record(span.SerializeToString(), resource.SerializeToString())

    assert decoded.span() == span
    assert decoded.resource() == resource
    assert decoded.service_name == "api"


def test_record_time_comes_from_the_ulid_key() -> None:
    assert ulid_millis(KEY) == 1_717_171_717_123
    assert ulid_time(KEY) == datetime(2024, 5, 31, 16, 8, 37, 123_000, tzinfo=UTC)
    assert record().ingested_at == ulid_time(KEY)


def test_record_is_an_immutable_value() -> None:
    value = record(b"s", b"r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.key = b""  # type: ignore[misc]
    assert value == SpanRecord(KEY, b"s", b"r")


def test_service_name_falls_back_like_the_go_backend() -> None:
    assert record().service_name == NO_SERVICE_NAME
    assert service_name_of(make_resource(None, host="h")) == NO_SERVICE_NAME
    numeric = resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(int_value=7))]
    )
    assert service_name_of(numeric) == NO_SERVICE_NAME


def test_undecodable_bytes_raise_decode_error() -> None:
    with pytest.raises(DecodeError):
        record(span=b"\xff\xff").span()
    with pytest.raises(DecodeError):
        record(resource=b"\xff\xff").resource()


def test_catalog_decodes_each_resource_once_and_stays_bounded() -> None:
    catalog = ResourceCatalog(max_entries=2)
    web, db, cache = (make_resource(name).SerializeToString() for name in ("web", "db", "cache"))

    assert catalog.service_name(web) == "web"
    assert catalog.service_name(web) == "web"
    assert len(catalog) == 1
    assert catalog.service_name(db) == "db"
    assert catalog.service_name(cache) == "cache"  # over the bound: starts afresh
    assert len(catalog) == 1
    with pytest.raises(DecodeError):
        catalog.service_name(b"\xff")


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", IngestionDeadlineError),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (100 vs. 10)",
            IngestionMessageTooLargeError,
        ),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", IngestionError),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect", IngestionUnavailableError),
        (
            grpc.StatusCode.INTERNAL,
            "Received RST_STREAM with error code 2",
            IngestionUnavailableError,
        ),
        (grpc.StatusCode.INTERNAL, "bug", IngestionError),
        (grpc.StatusCode.UNIMPLEMENTED, "no such method", IngestionError),
    ],
)
def test_statuses_map_to_typed_errors(
    code: grpc.StatusCode, details: str, expected: type[IngestionError]
) -> None:
    error = ingestion_error(code, details)

    assert type(error) is expected
    assert error.code is code
    assert details in error.details
    assert str(error).startswith(code.name)


def test_connection_loss() -> None:
    assert is_connection_loss(grpc.StatusCode.UNAVAILABLE, "")
    assert is_connection_loss(grpc.StatusCode.CANCELLED, "server going away")
    assert is_connection_loss(grpc.StatusCode.UNKNOWN, "Stream removed")
    assert not is_connection_loss(grpc.StatusCode.UNKNOWN, "Exception iterating responses")
    assert not is_connection_loss(grpc.StatusCode.PERMISSION_DENIED, "Socket closed")


def test_rpc_status_of_an_error_without_a_call() -> None:
    # A bare RpcError (no call behind it) is what grpc raises for some local failures.
    assert rpc_status(grpc.RpcError("local failure")) == (grpc.StatusCode.UNKNOWN, "local failure")
