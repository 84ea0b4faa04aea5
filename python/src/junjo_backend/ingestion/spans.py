"""WAL entries as the ingestion-service hands them out: typed records and their decoding.

A record keeps the bytes exactly as they came off the wire. Decoding is left to whoever
needs it, because the poller's default sink only needs the service name (from a resource
that thousands of spans share) and the key's timestamp, while `spans tail` needs the span.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

NO_SERVICE_NAME = "NO_SERVICE_NAME"
SERVICE_NAME_ATTRIBUTE = "service.name"
ULID_BYTES = 16

_decode_span = trace_pb2.Span.FromString
_decode_resource = resource_pb2.Resource.FromString


def ulid_millis(key: bytes) -> int:
    """The 48-bit millisecond Unix timestamp at the front of a ULID key."""
    return int.from_bytes(key[:6], "big")


def ulid_time(key: bytes) -> datetime:
    """The time a ULID key was made: for a WAL key, when the ingestion-service received the span."""
    return datetime.fromtimestamp(ulid_millis(key) / 1000, UTC)


def service_name_of(resource: resource_pb2.Resource) -> str:
    """The resource's `service.name` string, or `NO_SERVICE_NAME` (as the Go backend did)."""
    for attribute in resource.attributes:
        if attribute.key == SERVICE_NAME_ATTRIBUTE and attribute.value.string_value:
            return attribute.value.string_value
    return NO_SERVICE_NAME


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One WAL entry: its 16-byte ULID key and the OTLP span and resource bytes, undecoded."""

    key: bytes
    span_bytes: bytes
    resource_bytes: bytes

    def span(self) -> trace_pb2.Span:
        """The decoded OTLP span; raises `google.protobuf.message.DecodeError` on bad bytes."""
        return _decode_span(self.span_bytes)

    def resource(self) -> resource_pb2.Resource:
        """The decoded OTLP resource; raises `DecodeError` on bad bytes."""
        return _decode_resource(self.resource_bytes)

    @property
    def ingested_at(self) -> datetime:
        """When the ingestion-service received the span (the key's ULID timestamp)."""
        return ulid_time(self.key)

    @property
    def service_name(self) -> str:
        """The resource's `service.name`, or `NO_SERVICE_NAME`; decodes the resource each time."""
        return service_name_of(self.resource())


class ResourceCatalog:
    """Decoded resources, and their service names, by their serialized bytes.

    Every span from one process carries the same resource bytes, so a WAL with millions of
    spans holds a handful of distinct resources: decoding each once saves most of the
    decoding work. The catalog forgets everything when it grows past `max_entries`, which
    bounds memory if some sender varies its resource per span.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[resource_pb2.Resource, str]] = {}

    def _entry(self, resource_bytes: bytes) -> tuple[resource_pb2.Resource, str]:
        entry = self._entries.get(resource_bytes)
        if entry is None:
            resource = _decode_resource(resource_bytes)
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            entry = self._entries[resource_bytes] = (resource, service_name_of(resource))
        return entry

    def service_name(self, resource_bytes: bytes) -> str:
        """The service name of a serialized resource; raises `DecodeError` on bad bytes."""
        return self._entry(resource_bytes)[1]

    def resource(self, resource_bytes: bytes) -> resource_pb2.Resource:
        """The decoded resource, shared by every caller (read it, never change it)."""
        return self._entry(resource_bytes)[0]

    def __len__(self) -> int:
        """How many distinct resources are cached."""
        return len(self._entries)
