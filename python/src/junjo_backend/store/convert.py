"""WAL records to the Go backend's rows: every column derived as Go derives it.

Shared by the DuckDB and PostgreSQL stores. The rules (and the deliberate changes) are in
`docs/design/span-store.md`; the golden test in `tests/store/` holds them to what the Go
backend stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

    from junjo_backend.ingestion.spans import SpanRecord

# Our own fixed namespace for patch ids: never change it, or redelivered patches of a
# stored span would get new ids and be stored twice.
PATCH_ID_NAMESPACE: Final = uuid.UUID("246e7d0b-1c76-4ad8-a646-a393d6b3ae79")


@dataclass(frozen=True, slots=True)
class SetAside:
    """A span (or one of a span's patches) the Go backend could not store, kept aside."""

    key: bytes  # WAL key
    trace_id: str  # lowercase hex, '' when empty
    span_id: str
    reason: str  # one line, e.g. "flags 4294967295 exceed int32"
    span_bytes: bytes
    resource_bytes: bytes


@dataclass(frozen=True, slots=True)
class ConvertedBatch:
    """A batch's rows, as Arrow tables in Go's column order and types (`schema.py`)."""

    spans: pa.Table
    patches: pa.Table
    set_aside: list[SetAside]
    last_key: bytes  # the last record's WAL key
    records: int


def patch_id(trace_id: str, span_id: str, event_index: int) -> str:
    """A state patch's id: uuid5 of `trace_id/span_id/event_index` over our namespace.

    `event_index` is the event's position among all the span's events, so a redelivered
    span yields the same ids (Go used a random UUID, and duplicated patches).
    """
    return str(uuid.uuid5(PATCH_ID_NAMESPACE, f"{trace_id}/{span_id}/{event_index}"))


def convert_batch(records: Sequence[SpanRecord]) -> ConvertedBatch:
    """Convert `records` (in key order) to rows; a span Go could not store is set aside.

    Within one batch the first (trace_id, span_id) is kept and its patches once.
    """
    raise NotImplementedError("the conversion lands next (issue 18 item 2)")
