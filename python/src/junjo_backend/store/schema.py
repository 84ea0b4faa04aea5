"""The store's tables: the Go backend's `spans` and `state_patches`, and two of our own.

The Go DDL is kept here as data, column for column (junjo-server a556d9e,
`backend/db_duckdb/`), so a Go-made DuckDB file and ours hold the same tables. Like Go, a
table is created only when it is missing: there are no migrations. The Arrow schemas the
conversion builds follow the same column lists. See `docs/design/span-store.md`.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import pyarrow as pa

SPANS_TABLE: Final = "spans"
STATE_PATCHES_TABLE: Final = "state_patches"
WATERMARK_TABLE: Final = "junjo_store_watermark"
SET_ASIDE_TABLE: Final = "junjo_spans_set_aside"

# (name, SQL type) in Go's order; the VARCHAR(n) lengths are declared, not enforced.
SPANS_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("trace_id", "VARCHAR(32) NOT NULL"),
    ("span_id", "VARCHAR(16) NOT NULL"),
    ("parent_span_id", "VARCHAR(16)"),
    ("service_name", "VARCHAR NOT NULL"),
    ("name", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("start_time", "TIMESTAMPTZ NOT NULL"),
    ("end_time", "TIMESTAMPTZ NOT NULL"),
    ("status_code", "VARCHAR"),
    ("status_message", "VARCHAR"),
    ("attributes_json", "JSON"),
    ("events_json", "JSON"),
    ("links_json", "JSON"),
    ("trace_flags", "INTEGER"),
    ("trace_state", "VARCHAR"),
    ("junjo_id", "VARCHAR"),
    ("junjo_parent_id", "VARCHAR"),
    ("junjo_span_type", "VARCHAR"),
    ("junjo_wf_state_start", "JSON"),
    ("junjo_wf_state_end", "JSON"),
    ("junjo_wf_graph_structure", "JSON"),
    ("junjo_wf_store_id", "VARCHAR"),
)

STATE_PATCHES_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("patch_id", "VARCHAR PRIMARY KEY"),
    ("service_name", "VARCHAR NOT NULL"),
    ("trace_id", "VARCHAR(32) NOT NULL"),
    ("span_id", "VARCHAR(16) NOT NULL"),
    ("workflow_id", "VARCHAR NOT NULL"),
    ("node_id", "VARCHAR NOT NULL"),
    ("event_time", "TIMESTAMPTZ NOT NULL"),
    ("patch_json", "JSON NOT NULL"),
    ("patch_store_id", "VARCHAR NOT NULL"),
)

SPANS_INDEXES: Final[tuple[tuple[str, str], ...]] = (
    ("idx_trace_id", "trace_id"),
    ("idx_parent_span_id", "parent_span_id"),
    ("idx_start_time", "start_time"),
    ("idx_end_time", "end_time"),
    ("idx_junjo_id", "junjo_id"),
    ("idx_junjo_span_type", "junjo_span_type"),
)

STATE_PATCHES_INDEXES: Final[tuple[tuple[str, str], ...]] = (
    ("idx_state_patches_trace_id_span_id", "trace_id, span_id"),
    ("idx_state_patches_workflow_id", "workflow_id"),
    ("idx_state_patches_node_id", "node_id"),
    ("idx_state_patches_event_time", "event_time"),
)

SPAN_COLUMN_NAMES: Final = tuple(name for name, _ in SPANS_COLUMNS)
PATCH_COLUMN_NAMES: Final = tuple(name for name, _ in STATE_PATCHES_COLUMNS)


def _arrow_schema(columns: tuple[tuple[str, str], ...]) -> pa.Schema:
    # Imported here: a conversion worker process builds no Arrow and need not load it.
    import pyarrow as pa  # noqa: PLC0415

    # Timestamps built from integers in UTC, so DuckDB's session time zone never enters;
    # every JSON column is text (validated by the conversion).
    types = {"TIMESTAMPTZ": pa.timestamp("us", tz="UTC"), "INTEGER": pa.int32()}
    fields = []
    for name, sql in columns:
        base = sql.split(" ", 1)[0].split("(", 1)[0]
        fields.append(pa.field(name, types.get(base, pa.string()), "NOT NULL" not in sql))
    return pa.schema(fields)


@cache
def arrow_schemas() -> tuple[pa.Schema, pa.Schema]:
    """The Arrow schemas of `spans` and `state_patches` rows, in Go's column order."""
    return _arrow_schema(SPANS_COLUMNS), _arrow_schema(STATE_PATCHES_COLUMNS)


def __getattr__(name: str) -> pa.Schema:
    """`SPANS_ARROW` and `PATCHES_ARROW`, made on first use (see `arrow_schemas`)."""
    if name == "SPANS_ARROW":
        return arrow_schemas()[0]
    if name == "PATCHES_ARROW":
        return arrow_schemas()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _create_table(name: str, columns: tuple[tuple[str, str], ...], tail: str) -> str:
    body = ",\n  ".join(f"{column} {sql}" for column, sql in columns)
    return f"CREATE TABLE {name} (\n  {body}{tail}\n)"


def _create_indexes(table: str, indexes: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})" for name, cols in indexes)


# Each table's statements, run only when `information_schema.tables` lacks the table.
DUCKDB_TABLES: Final[dict[str, tuple[str, ...]]] = {
    SPANS_TABLE: (
        _create_table(SPANS_TABLE, SPANS_COLUMNS, ",\n\n  PRIMARY KEY (trace_id, span_id)"),
        *_create_indexes(SPANS_TABLE, SPANS_INDEXES),
    ),
    STATE_PATCHES_TABLE: (
        _create_table(
            STATE_PATCHES_TABLE,
            STATE_PATCHES_COLUMNS,
            ",\n  FOREIGN KEY (trace_id, span_id) REFERENCES spans (trace_id, span_id)",
        ),
        *_create_indexes(STATE_PATCHES_TABLE, STATE_PATCHES_INDEXES),
    ),
    # One row (id = 1): the last WAL key whose batch this file holds.
    WATERMARK_TABLE: (
        f"CREATE TABLE {WATERMARK_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), last_key BLOB)",
    ),
    # What the Go backend could not store: a span, or one of its patches (the reason names the
    # event), keyed so that a redelivery adds nothing.
    SET_ASIDE_TABLE: (
        (
            f"CREATE TABLE {SET_ASIDE_TABLE} (\n"
            "  wal_key BLOB NOT NULL,\n"
            "  trace_id VARCHAR NOT NULL,\n"
            "  span_id VARCHAR NOT NULL,\n"
            "  reason VARCHAR NOT NULL,\n"
            "  span_bytes BLOB NOT NULL,\n"
            "  resource_bytes BLOB NOT NULL,\n"
            "  set_aside_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,\n"
            "  PRIMARY KEY (wal_key, reason)\n"
            ")"
        ),
    ),
}


# PostgreSQL: the same tables in PostgreSQL types. Ids are text (Go's lengths are declared,
# not enforced), times timestamptz, and JSON columns `json`, not `jsonb`: json keeps the
# stored text byte for byte (Go's key order, escapes and `\u0000`), as the Go file does.
_POSTGRES_TYPES: Final = {
    "VARCHAR": "text",
    "TIMESTAMPTZ": "timestamptz",
    "JSON": "json",
    "INTEGER": "integer",
}


def _postgres_columns(columns: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    translated = []
    for name, sql in columns:
        base, _, rest = sql.partition(" ")
        translated.append((name, " ".join([_POSTGRES_TYPES[base.split("(", 1)[0]], rest]).strip()))
    return tuple(translated)


POSTGRES_SPANS_COLUMNS: Final = _postgres_columns(SPANS_COLUMNS)
POSTGRES_PATCHES_COLUMNS: Final = _postgres_columns(STATE_PATCHES_COLUMNS)

# Ours, for the read API (the Go schema has neither): the newest root spans of a service
# (`root-spans`, `root-spans-filtered`) straight off a small partial index, and the
# service-name walk and `spans/type/workflow` off the full one. See docs/design/span-api.md.
POSTGRES_API_INDEXES: Final[tuple[str, ...]] = (
    "CREATE INDEX IF NOT EXISTS junjo_idx_spans_service_start ON spans (service_name, start_time)",
    (
        "CREATE INDEX IF NOT EXISTS junjo_idx_spans_service_roots "
        "ON spans (service_name, start_time) WHERE parent_span_id IS NULL"
    ),
)


def _if_missing(statement: str) -> str:
    return statement.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1)


# Run in order, each idempotent (replicas may start together: the store takes a lock first).
POSTGRES_DDL: Final[tuple[str, ...]] = (
    _if_missing(
        _create_table(SPANS_TABLE, POSTGRES_SPANS_COLUMNS, ",\n\n  PRIMARY KEY (trace_id, span_id)")
    ),
    *_create_indexes(SPANS_TABLE, SPANS_INDEXES),
    *POSTGRES_API_INDEXES,
    _if_missing(
        _create_table(
            STATE_PATCHES_TABLE,
            POSTGRES_PATCHES_COLUMNS,
            ",\n  FOREIGN KEY (trace_id, span_id) REFERENCES spans (trace_id, span_id)",
        )
    ),
    *_create_indexes(STATE_PATCHES_TABLE, STATE_PATCHES_INDEXES),
    (
        f"CREATE TABLE IF NOT EXISTS {SET_ASIDE_TABLE} (\n"
        "  wal_key bytea NOT NULL,\n"
        "  trace_id text NOT NULL,\n"
        "  span_id text NOT NULL,\n"
        "  reason text NOT NULL,\n"
        "  span_bytes bytea NOT NULL,\n"
        "  resource_bytes bytea NOT NULL,\n"
        "  set_aside_at timestamptz NOT NULL DEFAULT current_timestamp,\n"
        "  PRIMARY KEY (wal_key, reason)\n"
        ")"
    ),
)
