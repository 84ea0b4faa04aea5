"""WAL records to the Go backend's rows: every column derived as Go derives it.

Shared by the DuckDB and PostgreSQL stores. The rules, the deliberate changes and the
bad-input policy are in `docs/design/span-store.md`; the golden test in `tests/store/`
holds them to what the Go backend stored.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from junjo_backend.ingestion.spans import NO_SERVICE_NAME, SERVICE_NAME_ATTRIBUTE, SpanRecord
from junjo_backend.store.gojson import (
    GoJsonError,
    JsonValue,
    duckdb_json_valid,
    go_json,
)
from junjo_backend.store.schema import arrow_schemas

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import pyarrow as pa
    from opentelemetry.proto.common.v1 import common_pb2


# Our own fixed namespace for patch ids: never change it, or redelivered patches of a
# stored span would get new ids and be stored twice.
PATCH_ID_NAMESPACE: Final = uuid.UUID("246e7d0b-1c76-4ad8-a646-a393d6b3ae79")
_NAMESPACE_BYTES: Final = PATCH_ID_NAMESPACE.bytes

# Go's table, shifted against OTLP's (where 1 is INTERNAL): the Go frontend reads these.
KINDS: Final = {1: "CLIENT", 2: "SERVER", 3: "INTERNAL", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_CODES: Final = {0: "STATUS_CODE_UNSET", 1: "STATUS_CODE_OK", 2: "STATUS_CODE_ERROR"}
INT32_MAX: Final = 2**31 - 1

# Left out of attributes_json for every span: they have columns (or had, in Go's past).
DROPPED_KEYS: Final = frozenset(
    {
        "junjo.workflow_id",
        "node.id",
        "junjo.id",
        "junjo.parent_id",
        "junjo.span_type",
        "junjo.workflow.state.start",
        "junjo.workflow.state.end",
        "junjo.workflow.graph_structure",
        "junjo.workflow.store.id",
    }
)
WORKFLOW_JSON_KEYS: Final = (
    "junjo.workflow.state.start",
    "junjo.workflow.state.end",
    "junjo.workflow.graph_structure",
)
PATCH_KEYS: Final = frozenset({"junjo.state_json_patch", "junjo.store.id"})
# A set-aside patch's reason starts so (its span is stored); a set-aside span's never does.
PATCH_REASON_PREFIX: Final = "patch of event "
_NO_KEYS: Final = frozenset[str]()
_WORKFLOW_TYPES: Final = frozenset({"workflow", "subflow"})
_PRIMITIVES: Final = frozenset({"string_value", "int_value", "double_value", "bool_value"})
_SIGN_BIT: Final = 2**63
_WRAP: Final = 2**64

_decode_span = trace_pb2.Span.FromString
_decode_resource = resource_pb2.Resource.FromString


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
    span yields the same ids (Go used a random UUID, and duplicated patches). The same
    text as `str(uuid.uuid5(...))`, several times faster.
    """
    name = f"{trace_id}/{span_id}/{event_index}".encode()
    digest = hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).hexdigest()
    variant = "89ab"[int(digest[16], 16) & 3]  # RFC 4122's variant bits: 10xx
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-{variant}{digest[17:20]}-{digest[20:32]}"


class _Unstorable(Exception):  # noqa: N818 (not an error of ours: a span Go could not store)
    """The span cannot be stored as Go stores it; the message is the set-aside reason."""


def cut_at_nul(text: str) -> str:
    """`text` up to its first NUL: go-duckdb binds strings through C, which stops there."""
    if "\0" in text:
        return text[: text.index("\0")]
    return text


def micros(nanos: int) -> int:
    """A uint64 nanosecond time as Go stores it: floor(int64(ns) / 1000) microseconds."""
    return (nanos - _WRAP if nanos >= _SIGN_BIT else nanos) // 1000


def service_name(resource_bytes: bytes) -> str:
    """The resource's first string `service.name`; `NO_SERVICE_NAME` when empty or absent."""
    try:
        resource = _decode_resource(resource_bytes)
    except DecodeError:
        return NO_SERVICE_NAME
    for attribute in resource.attributes:
        value = attribute.value
        if attribute.key == SERVICE_NAME_ATTRIBUTE and value.WhichOneof("value") == "string_value":
            name = value.string_value
            return cut_at_nul(name) if name else NO_SERVICE_NAME
    return NO_SERVICE_NAME


def _array(values: Iterable[common_pb2.AnyValue]) -> tuple[list[JsonValue] | None, bool]:
    """An array's string, int, double and bool elements; None (JSON null) when none is left."""
    kept: list[JsonValue] = []
    floats = False
    for item in values:
        kind = item.WhichOneof("value")
        if kind in _PRIMITIVES:
            kept.append(getattr(item, kind))
            floats = floats or kind == "double_value"
    return kept or None, floats


def _kvlist(values: Iterable[common_pb2.KeyValue]) -> tuple[dict[str, JsonValue], bool]:
    """A kvlist's primitive values (last key wins); `{}` when none is left."""
    kept: dict[str, JsonValue] = {}
    floats = False
    for pair in values:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind in _PRIMITIVES:
            kept[pair.key] = getattr(value, kind)
            floats = floats or kind == "double_value"
    return kept, floats


def _attributes(
    attributes: Iterable[common_pb2.KeyValue],
    drop: frozenset[str],
    pick_keys: frozenset[str],
    pick: dict[str, str],
) -> tuple[dict[str, JsonValue], bool]:
    """Go's attribute map (last key wins, unset values left out) and whether it has floats.

    Keys in `drop` are left out. The first string value of each key in `pick_keys` goes
    into `pick` (Go's dedicated columns), in the same pass.
    """
    out: dict[str, JsonValue] = {}
    floats = False
    for attribute in attributes:
        key = attribute.key
        value = attribute.value
        kind = value.WhichOneof("value")
        if kind == "string_value":
            text = value.string_value
            if key in pick_keys and key not in pick:
                pick[key] = text
            if key not in drop:
                out[key] = text
        elif key in drop or kind is None:
            continue
        elif kind == "int_value" or kind == "bool_value":  # noqa: PLR1714 (fastest test)
            out[key] = getattr(value, kind)
        elif kind == "double_value":
            out[key] = value.double_value
            floats = True
        elif kind == "bytes_value":  # hex only at the top level; filtered out below it
            out[key] = value.bytes_value.hex()
        elif kind == "array_value":
            out[key], nested = _array(value.array_value.values)
            floats = floats or nested
        else:
            out[key], nested = _kvlist(value.kvlist_value.values)
            floats = floats or nested
    return out, floats


def _events(
    events: Sequence[trace_pb2.Span.Event],
) -> tuple[str, list[tuple[int, int, dict[str, str]]]]:
    """Go's events_json (`[]` for none), and each `set_state` event's index, time, strings.

    The strings are the event's first `junjo.state_json_patch` and `junjo.store.id`.
    """
    if not events:
        return "[]", []
    items: list[JsonValue] = []
    set_state: list[tuple[int, int, dict[str, str]]] = []
    floats = False
    for index, event in enumerate(events):
        name = event.name
        picked: dict[str, str] = {}
        attributes, nested = _attributes(
            event.attributes, _NO_KEYS, PATCH_KEYS if name == "set_state" else _NO_KEYS, picked
        )
        floats = floats or nested
        time_unix_nano = event.time_unix_nano
        if name == "set_state":
            set_state.append((index, time_unix_nano, picked))
        items.append(
            {
                "attributes": attributes,
                "droppedAttributesCount": event.dropped_attributes_count,
                "name": name,
                "timeUnixNano": time_unix_nano,
            }
        )
    try:
        return go_json(items, has_floats=floats), set_state
    except GoJsonError as error:
        raise _Unstorable(f"event attributes are not JSON-encodable ({error})") from None


def _workflow_columns(span_type: str, picked: dict[str, str]) -> tuple[str, str, str, str]:
    """junjo_wf_state_start/_end/_graph_structure/_store_id: set only for workflows, subflows."""
    if span_type not in _WORKFLOW_TYPES:
        return "{}", "{}", "{}", ""
    start, end, graph = (cut_at_nul(picked.get(key, "{}")) for key in WORKFLOW_JSON_KEYS)
    for key, text in zip(WORKFLOW_JSON_KEYS, (start, end, graph), strict=True):
        if text != "{}" and not duckdb_json_valid(text):
            raise _Unstorable(f"{key} is not valid JSON")
    # Go's default for the store id is "{}" too (it shares the JSON columns' helper).
    return start, end, graph, cut_at_nul(picked.get("junjo.workflow.store.id", "{}"))


def _patches(
    record: SpanRecord,
    set_state: list[tuple[int, int, dict[str, str]]],
    columns: tuple[str, str, str, str, str],
) -> tuple[list[tuple[object, ...]], list[SetAside]]:
    """One row per `set_state` event; a patch that is not valid JSON is set aside alone.

    `columns` are the patch rows' service_name, trace_id, span_id, workflow_id, node_id.
    """
    rows: list[tuple[object, ...]] = []
    aside: list[SetAside] = []
    trace_id, span_id = columns[1], columns[2]
    for index, time_unix_nano, found in set_state:
        patch = cut_at_nul(found.get("junjo.state_json_patch", "{}"))
        if patch != "{}" and not duckdb_json_valid(patch):
            reason = f"{PATCH_REASON_PREFIX}{index}: junjo.state_json_patch is not valid JSON"
            aside.append(_set_aside(record, trace_id, span_id, reason))
            continue
        store_id = cut_at_nul(found.get("junjo.store.id", ""))
        patch_row = (patch_id(trace_id, span_id, index), *columns, micros(time_unix_nano))
        rows.append((*patch_row, patch, store_id))
    return rows, aside


def _status(span: trace_pb2.Span) -> tuple[str, str]:
    if not span.HasField("status"):
        return "", ""
    code = span.status.code
    return STATUS_CODES.get(code, str(code)), cut_at_nul(span.status.message)


def is_patch_set_aside(row: SetAside) -> bool:
    """Whether `row` is one patch of a stored span, rather than a whole span."""
    return row.reason.startswith(PATCH_REASON_PREFIX)


def _patch_columns(
    ids: tuple[str, str, str], span_type: str, junjo_id: str
) -> tuple[str, str, str, str, str]:
    """A span's patch rows' service_name, trace_id, span_id, workflow_id and node_id."""
    trace_id, span_id, service = ids
    workflow_id = junjo_id if span_type == "workflow" else ""  # a subflow's is ""
    return service, trace_id, span_id, workflow_id, junjo_id if span_type == "node" else ""


def _convert_span(
    record: SpanRecord, span: trace_pb2.Span, ids: tuple[str, str, str]
) -> tuple[tuple[object, ...], list[tuple[object, ...]], list[SetAside]]:
    """The span's row, its patch rows and set-aside patches; raises `_Unstorable`.

    `ids` are the span's trace_id, span_id and service_name.
    """
    flags = span.flags
    if flags > INT32_MAX:
        raise _Unstorable(f"flags {flags} exceed int32")
    picked: dict[str, str] = {}
    attributes, floats = _attributes(span.attributes, DROPPED_KEYS, DROPPED_KEYS, picked)
    try:
        attributes_json = go_json(attributes, has_floats=floats)
    except GoJsonError as error:
        raise _Unstorable(f"attributes are not JSON-encodable ({error})") from None
    span_type = picked.get("junjo.span_type", "")
    junjo_id = cut_at_nul(picked.get("junjo.id", ""))
    workflow = _workflow_columns(span_type, picked)
    events_json, set_state = _events(span.events)
    trace_id, span_id, service = ids
    patches, aside = _patches(record, set_state, _patch_columns(ids, span_type, junjo_id))
    trace_state = span.trace_state
    row = (
        trace_id,
        span_id,
        span.parent_span_id.hex() or None,
        service,
        cut_at_nul(span.name),
        KINDS.get(span.kind, "UNSPECIFIED"),
        micros(span.start_time_unix_nano),
        micros(span.end_time_unix_nano),
        *_status(span),
        attributes_json,
        events_json,
        "[]",
        flags,
        cut_at_nul(trace_state) if trace_state else None,
        junjo_id,
        cut_at_nul(picked.get("junjo.parent_id", "")),
        cut_at_nul(span_type),
        *workflow,
    )
    return row, patches, aside


def _set_aside(record: SpanRecord, trace_id: str, span_id: str, reason: str) -> SetAside:
    return SetAside(record.key, trace_id, span_id, reason, record.span_bytes, record.resource_bytes)


def _table(rows: list[tuple[object, ...]], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa  # noqa: PLC0415 (only where Arrow is built: see arrow_schemas)

    columns: list[Sequence[object]] = (
        list(zip(*rows, strict=True)) if rows else [() for _ in range(len(schema))]
    )
    arrays = [
        pa.array(column, type=field.type) for column, field in zip(columns, schema, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


class _Batch:
    """Rows collected from a batch's records, in order; the first of each span id is kept."""

    def __init__(self, service_of: Callable[[bytes], str]) -> None:
        self.spans: list[tuple[object, ...]] = []
        self.patches: list[tuple[object, ...]] = []
        self.set_aside: list[SetAside] = []
        self._seen: set[tuple[str, str]] = set()
        self._service_of = service_of

    def add(self, record: SpanRecord) -> None:
        try:
            span = _decode_span(record.span_bytes)
        except DecodeError:
            self.set_aside.append(_set_aside(record, "", "", "span does not decode"))
            return
        trace_id, span_id = span.trace_id.hex(), span.span_id.hex()
        if (trace_id, span_id) in self._seen:
            return
        ids = (trace_id, span_id, self._service_of(record.resource_bytes))
        try:
            row, patches, aside = _convert_span(record, span, ids)
        except _Unstorable as error:
            self.set_aside.append(_set_aside(record, trace_id, span_id, str(error)))
            return
        self._seen.add((trace_id, span_id))
        self.spans.append(row)
        self.patches.extend(patches)
        self.set_aside.extend(aside)


@dataclass(frozen=True, slots=True)
class ConvertedRows:
    """A batch's rows as Python tuples (in Go's column order): `convert_batch` before Arrow."""

    spans: list[tuple[object, ...]]
    patches: list[tuple[object, ...]]
    set_aside: list[SetAside]
    last_key: bytes
    records: int


def convert_rows(records: Sequence[SpanRecord]) -> ConvertedRows:
    """Convert `records` (in key order) to row tuples; what Go could not store is set aside.

    Within one batch the first stored (trace_id, span_id) is kept, with its patches once.
    """
    services: dict[bytes, str] = {}

    def service_of(resource_bytes: bytes) -> str:
        name = services.get(resource_bytes)
        if name is None:
            name = services[resource_bytes] = service_name(resource_bytes)
        return name

    batch = _Batch(service_of)
    for record in records:
        batch.add(record)
    last_key = records[-1].key if records else b""
    return ConvertedRows(batch.spans, batch.patches, batch.set_aside, last_key, len(records))


def convert_fields(fields: list[tuple[bytes, bytes, bytes]]) -> ConvertedRows:
    """`convert_rows` of the records with these (key, span, resource) bytes (a worker's task)."""
    return convert_rows([SpanRecord(*row) for row in fields])


def to_arrow(rows: ConvertedRows) -> ConvertedBatch:
    """The rows as Arrow tables."""
    spans_schema, patches_schema = arrow_schemas()
    return ConvertedBatch(
        spans=_table(rows.spans, spans_schema),
        patches=_table(rows.patches, patches_schema),
        set_aside=rows.set_aside,
        last_key=rows.last_key,
        records=rows.records,
    )


def convert_batch(records: Sequence[SpanRecord]) -> ConvertedBatch:
    """Convert `records` (in key order) to rows; what Go could not store is set aside.

    Within one batch the first stored (trace_id, span_id) is kept, with its patches once.
    """
    return to_arrow(convert_rows(records))
