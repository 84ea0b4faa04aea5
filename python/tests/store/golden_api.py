"""The golden store for the read API: exactly the expected rows, in a DuckDB file or a
PostgreSQL database, and the comparison the golden README asks for."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlalchemy import text

from junjo_backend.database import close_engine, create_engine
from junjo_backend.store import schema

GOLDEN = Path(__file__).parent / "golden"
_TIMES = ("start_time", "end_time")


@functools.cache
def _expected_rows() -> tuple[dict[str, Any], ...]:
    lines = (GOLDEN / "expected-spans.jsonl").read_text().splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def expected_rows() -> list[dict[str, Any]]:
    """`expected-spans.jsonl`: the `spans` rows after every golden batch (copies)."""
    return [dict(row) for row in _expected_rows()]


def expected_routes() -> list[tuple[str, Any]]:
    """`expected-api.jsonl`: each route and the body the Go backend returned."""
    lines = (GOLDEN / "expected-api.jsonl").read_text().splitlines()
    return [(entry["route"], entry["body"]) for entry in map(json.loads, lines) if entry]


def fill_duckdb(path: Path, rows: list[dict[str, Any]]) -> None:
    """Create the Go tables in a new DuckDB file and insert `rows` as they are."""
    with contextlib.closing(
        duckdb.connect(str(path), config={"storage_compatibility_version": "v1.0.0"})
    ) as conn:
        for statements in schema.DUCKDB_TABLES.values():
            for statement in statements:
                conn.execute(statement)
        # Through Arrow: DuckDB inserts parameter rows at about 1,000 a second.
        table = pa.Table.from_pylist([_with_times(row) for row in rows], schema.SPANS_ARROW)
        conn.register("new_rows", table)
        conn.execute("INSERT INTO spans SELECT * FROM new_rows")


async def fill_postgres(url: str, rows: list[dict[str, Any]]) -> None:
    """Create the store's tables (`schema.POSTGRES_DDL`) and insert `rows` as they are."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in schema.POSTGRES_DDL:
                await conn.execute(text(statement))
            names = schema.SPAN_COLUMN_NAMES
            values = ", ".join(
                f"CAST(:{name} AS json)" if "json" in sql else f":{name}"
                for name, sql in schema.POSTGRES_SPANS_COLUMNS
            )
            insert = text(f"INSERT INTO spans ({', '.join(names)}) VALUES ({values})")  # noqa: S608
            await conn.execute(insert, [_with_times(row) for row in rows])
    finally:
        await close_engine(engine)


def _with_times(row: dict[str, Any]) -> dict[str, Any]:
    converted = dict(row)
    for name in _TIMES:
        converted[name] = dt.datetime.fromisoformat(row[name])
    return converted


def as_browser_reads(body: bytes | str) -> Any:
    """The body parsed with every number as a double, as a browser reads it."""
    return json.loads(body, parse_int=float, parse_float=float)


def _canonical(row: object) -> str:
    return json.dumps(row, sort_keys=True)


def assert_same_body(route: str, got: Any, want: Any) -> None:
    """Equal bodies, except that rows sharing a `start_time` may come in any order."""
    if not (isinstance(want, list) and want and isinstance(want[0], dict)):
        assert got == want, route
        return
    assert isinstance(got, list), route
    # The same start_time sequence and the same rows: only rows within one start_time
    # may have moved.
    assert [row["start_time"] for row in got] == [row["start_time"] for row in want], route
    assert sorted(map(_canonical, got)) == sorted(map(_canonical, want)), route
