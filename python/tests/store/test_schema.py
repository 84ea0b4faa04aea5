import uuid

import duckdb

from junjo_backend.store import schema
from junjo_backend.store.convert import PATCH_ID_NAMESPACE, patch_id

TZ = "TIMESTAMP WITH TIME ZONE"
# The Go schema, as SPAN_STORE.md lists it: (column, type, nullable).
GO_SPANS = [
    ("trace_id", "VARCHAR", False),
    ("span_id", "VARCHAR", False),
    ("parent_span_id", "VARCHAR", True),
    ("service_name", "VARCHAR", False),
    ("name", "VARCHAR", True),
    ("kind", "VARCHAR", True),
    ("start_time", TZ, False),
    ("end_time", TZ, False),
    ("status_code", "VARCHAR", True),
    ("status_message", "VARCHAR", True),
    ("attributes_json", "JSON", True),
    ("events_json", "JSON", True),
    ("links_json", "JSON", True),
    ("trace_flags", "INTEGER", True),
    ("trace_state", "VARCHAR", True),
    ("junjo_id", "VARCHAR", True),
    ("junjo_parent_id", "VARCHAR", True),
    ("junjo_span_type", "VARCHAR", True),
    ("junjo_wf_state_start", "JSON", True),
    ("junjo_wf_state_end", "JSON", True),
    ("junjo_wf_graph_structure", "JSON", True),
    ("junjo_wf_store_id", "VARCHAR", True),
]
GO_PATCHES = [
    ("patch_id", "VARCHAR", False),
    ("service_name", "VARCHAR", False),
    ("trace_id", "VARCHAR", False),
    ("span_id", "VARCHAR", False),
    ("workflow_id", "VARCHAR", False),
    ("node_id", "VARCHAR", False),
    ("event_time", TZ, False),
    ("patch_json", "JSON", False),
    ("patch_store_id", "VARCHAR", False),
]
GO_INDEXES = {
    ("idx_trace_id", "spans"),
    ("idx_parent_span_id", "spans"),
    ("idx_start_time", "spans"),
    ("idx_end_time", "spans"),
    ("idx_junjo_id", "spans"),
    ("idx_junjo_span_type", "spans"),
    ("idx_state_patches_trace_id_span_id", "state_patches"),
    ("idx_state_patches_workflow_id", "state_patches"),
    ("idx_state_patches_node_id", "state_patches"),
    ("idx_state_patches_event_time", "state_patches"),
}


def test_patch_id_is_uuid5_of_trace_span_and_event_index() -> None:
    expected = uuid.uuid5(PATCH_ID_NAMESPACE, "ab/cd/3")
    assert patch_id("ab", "cd", 3) == str(expected)
    assert patch_id("ab", "cd", 3) != patch_id("ab", "cd", 4)
    assert uuid.UUID(patch_id("ab", "cd", 3)).version == 5


def _created() -> duckdb.DuckDBPyConnection:
    db = duckdb.connect(":memory:")
    for statements in schema.DUCKDB_TABLES.values():
        for statement in statements:
            db.execute(statement)
    return db


def _columns(db: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str, bool]]:
    rows = db.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return [(name, data_type, nullable == "YES") for name, data_type, nullable in rows]


def test_ddl_creates_go_tables_with_their_columns_keys_and_indexes() -> None:
    db = _created()
    assert _columns(db, "spans") == GO_SPANS
    assert _columns(db, "state_patches") == GO_PATCHES
    indexes = set(db.execute("SELECT index_name, table_name FROM duckdb_indexes()").fetchall())
    assert indexes == GO_INDEXES
    constraints = db.execute(
        "SELECT table_name, constraint_type, constraint_column_names FROM duckdb_constraints()"
        " WHERE constraint_type IN ('PRIMARY KEY', 'FOREIGN KEY')"
        " AND table_name IN ('spans', 'state_patches') ORDER BY ALL"
    ).fetchall()
    assert constraints == [
        ("spans", "PRIMARY KEY", ["trace_id", "span_id"]),
        ("state_patches", "FOREIGN KEY", ["trace_id", "span_id"]),
        ("state_patches", "PRIMARY KEY", ["patch_id"]),
    ]


def test_arrow_schemas_follow_the_column_lists() -> None:
    assert schema.SPANS_ARROW.names == [name for name, _, _ in GO_SPANS]
    assert schema.PATCHES_ARROW.names == [name for name, _, _ in GO_PATCHES]
    assert str(schema.SPANS_ARROW.field("start_time").type) == "timestamp[us, tz=UTC]"
    assert str(schema.SPANS_ARROW.field("trace_flags").type) == "int32"
