"""The Go backend's six read queries over either store, and their JSON bodies.

The SQL follows junjo-server's `backend/api/otel/*.sql` (same filters, order and limits),
once per dialect; `render_spans` encodes rows as the Go API does (see
`docs/design/span-api.md`). Readers run a query and raise `StoreUnavailable` (HTTP 503:
this process cannot answer, with the reason) or `SpanReadError` (HTTP 500: the database
failed; the message never holds SQL or credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any, Final, Protocol

import duckdb
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from junjo_backend.store.base import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# The `spans` columns in Go's order, with how each is rendered.
_TEXT, _JSON, _TIME, _INT = "text", "json", "time", "int"
COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("trace_id", _TEXT),
    ("span_id", _TEXT),
    ("parent_span_id", _TEXT),
    ("service_name", _TEXT),
    ("name", _TEXT),
    ("kind", _TEXT),
    ("start_time", _TIME),
    ("end_time", _TIME),
    ("status_code", _TEXT),
    ("status_message", _TEXT),
    ("attributes_json", _JSON),
    ("events_json", _JSON),
    ("links_json", _JSON),
    ("trace_flags", _INT),
    ("trace_state", _TEXT),
    ("junjo_id", _TEXT),
    ("junjo_parent_id", _TEXT),
    ("junjo_span_type", _TEXT),
    ("junjo_wf_state_start", _JSON),
    ("junjo_wf_state_end", _JSON),
    ("junjo_wf_graph_structure", _JSON),
    ("junjo_wf_store_id", _TEXT),
)


def _select_list(time_of: str, json_of: str, value_of: str) -> str:
    """The column list: times as integer microseconds, every other column as JSON text.

    No time zone enters the times; the database encodes the rest (`null` for NULL), far
    cheaper there than one Python call per field.
    """
    expressions = {_TIME: time_of, _JSON: json_of, _TEXT: value_of, _INT: value_of}
    return ", ".join(f"{expressions[kind].format(name)} AS {name}" for name, kind in COLUMNS)


_DUCKDB_COLUMNS: Final = _select_list(
    "epoch_us({})", "coalesce({}::VARCHAR, 'null')", "coalesce(to_json({})::VARCHAR, 'null')"
)
# SQLAlchemy's asyncpg dialect parses `json` values; `::text` keeps the stored text.
_POSTGRES_COLUMNS: Final = _select_list(
    "(extract(epoch FROM {}) * 1000000)::bigint",
    "coalesce({}::text, 'null')",
    "coalesce(to_json({})::text, 'null')",
)


@dataclass(frozen=True, slots=True)
class SpanQuery:
    """One read route's query: `{cols}` is the column list, `:name` the parameters."""

    name: str
    sql: str
    names_only: bool = False  # a list of strings, not rows
    postgres_sql: str | None = None  # where PostgreSQL needs other text

    def for_duckdb(self) -> str:
        """The query for DuckDB (positional `$name` parameters)."""
        sql = self.sql.replace("{cols}", _DUCKDB_COLUMNS)
        return (
            sql.replace(":service", "$service")
            .replace(":trace", "$trace")
            .replace(":span", "$span")
        )

    def for_postgres(self) -> str:
        """The query for PostgreSQL (SQLAlchemy `:name` parameters)."""
        return (self.postgres_sql or self.sql).replace("{cols}", _POSTGRES_COLUMNS)


ROOT_LIMIT: Final = 500  # Go's LIMIT on both root-span routes

SERVICE_NAMES: Final = SpanQuery(
    "span-service-names",
    "SELECT DISTINCT service_name FROM spans ORDER BY service_name",
    names_only=True,
    # Bytewise order, as DuckDB sorts (the database's collation could differ). The
    # recursive walk reads each name once off the (service_name, start_time) index
    # instead of every row.
    postgres_sql=(
        "WITH RECURSIVE names(name) AS ("
        "(SELECT min(service_name) FROM spans) UNION ALL "
        "SELECT (SELECT min(service_name) FROM spans WHERE service_name > names.name) "
        "FROM names WHERE names.name IS NOT NULL) "
        'SELECT name FROM names WHERE name IS NOT NULL ORDER BY name COLLATE "C"'
    ),
)
ROOT_SPANS: Final = SpanQuery(
    "root-spans",
    "SELECT {cols} FROM spans WHERE service_name = :service AND parent_span_id IS NULL "  # noqa: S608 (constants only)
    f"ORDER BY start_time DESC LIMIT {ROOT_LIMIT}",
)
# Go: `trace_id IN (SELECT trace_id FROM spans WHERE attributes_json ->> ... = 'LLM')`. The
# EXISTS form asks the same question per root, so the trace index answers it instead of a
# scan of every span's JSON.
_FILTERED: Final = (
    "SELECT {cols} FROM spans AS root WHERE service_name = :service "  # noqa: S608 (constants only)
    "AND parent_span_id IS NULL AND EXISTS (SELECT 1 FROM spans AS llm "
    "WHERE llm.trace_id = root.trace_id AND {llm}) "
    f"ORDER BY start_time DESC LIMIT {ROOT_LIMIT}"
)
_LLM: Final = "llm.attributes_json ->> 'openinference.span.kind' = 'LLM'"
ROOT_SPANS_FILTERED: Final = SpanQuery(
    "root-spans-filtered",
    _FILTERED.replace("{llm}", _LLM),
    # PostgreSQL's `->>` fails on any `\u0000` in the JSON text (Go keeps NULs that way).
    # `\u0001` in its place reads the same key and value ('LLM' holds no NUL), and the
    # replacement stays valid JSON even inside an escaped backslash (`\\u0000`).
    postgres_sql=_FILTERED.replace(
        "{llm}",
        _LLM.replace(
            "llm.attributes_json", "replace(llm.attributes_json::text, '\\u0000', '\\u0001')::json"
        ),
    ),
)
NESTED_SPANS: Final = SpanQuery(
    "nested-spans",
    "SELECT {cols} FROM spans WHERE trace_id = :trace ORDER BY start_time DESC",
)
ONE_SPAN: Final = SpanQuery(
    "span",
    "SELECT {cols} FROM spans WHERE trace_id = :trace AND span_id = :span",
)
WORKFLOW_SPANS: Final = SpanQuery(
    "workflow-spans",
    "SELECT {cols} FROM spans WHERE junjo_span_type = 'workflow' AND service_name = :service "
    "ORDER BY start_time DESC",
)


_UNDEFINED_TABLE: Final = "42P01"  # PostgreSQL's SQLSTATE for a missing table


class SpanReadError(Exception):
    """The database failed to answer; `str()` is one line without SQL or credentials."""


class SpanReader(Protocol):
    """Runs a read query over one store."""

    async def fetch(self, query: SpanQuery, params: dict[str, str]) -> list[tuple[Any, ...]]:
        """The query's rows; raises `StoreUnavailable` or `SpanReadError`."""
        ...


class UnavailableReader:
    """A process that cannot read spans at all (e.g. `SPAN_STORE=none`): always 503."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    async def fetch(self, query: SpanQuery, params: dict[str, str]) -> list[tuple[Any, ...]]:  # noqa: ARG002 (the protocol's signature)
        """Raise `StoreUnavailable` with the reason given."""
        raise StoreUnavailable(self._reason)


class DuckDBReader:
    """Reads through a cursor of the DuckDB store this process holds, in a worker thread.

    `cursor` returns a new cursor of the open store, or raises `StoreUnavailable` when
    this process does not hold the file (only the poller's leader does).
    """

    def __init__(self, cursor: Callable[[], duckdb.DuckDBPyConnection]) -> None:
        self._cursor = cursor

    async def fetch(self, query: SpanQuery, params: dict[str, str]) -> list[tuple[Any, ...]]:
        """Run `query` off the event loop (DuckDB releases the GIL while it runs)."""
        return await asyncio.to_thread(self._run, query.for_duckdb(), params)

    def _run(self, sql: str, params: dict[str, str]) -> list[tuple[Any, ...]]:
        try:
            with contextlib.closing(self._cursor()) as cursor:
                return cursor.execute(sql, params).fetchall()
        except duckdb.ConnectionException as exc:
            # The leader stepped down and closed the file under this read.
            raise StoreUnavailable("the span store was closed during the query") from exc
        except duckdb.Error as exc:
            log.warning("span query failed", extra={"error": _first_line(exc)})
            raise SpanReadError(f"span store query failed ({type(exc).__name__})") from exc


class PostgresReader:
    """Reads the PostgreSQL store through the backend's engine: every replica answers."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._opened = False  # once the tables were seen, a missing one is a real failure

    async def fetch(self, query: SpanQuery, params: dict[str, str]) -> list[tuple[Any, ...]]:
        """Run `query` on a pooled connection."""
        try:
            async with self._engine.connect() as conn:
                result = await conn.execute(text(query.for_postgres()), params)
                rows = [tuple(row) for row in result]
                self._opened = True
                return rows
        except (SQLAlchemyError, OSError) as exc:
            # SQLAlchemy's text holds the statement and its parameters: log the driver's
            # first line only, answer with the type.
            cause = getattr(exc, "orig", None) or exc
            if getattr(cause, "sqlstate", None) == _UNDEFINED_TABLE and not self._opened:
                raise StoreUnavailable(
                    "the span tables do not exist yet: the poller's leader creates them when "
                    "it opens the store"
                ) from exc
            log.warning("span query failed", extra={"error": _first_line(cause)})
            raise SpanReadError(f"span store query failed ({type(cause).__name__})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    # Spans of one response share few seconds: formatting each second once keeps the time
    # columns from costing more than the rest of the row.
    return (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def rfc3339(micros: int) -> str:
    """Go's `time.RFC3339Nano` of a UTC time: fraction trimmed of trailing zeros, or none."""
    seconds, fraction = divmod(micros, 1_000_000)
    if not fraction:
        return f"{_second(seconds)}Z"
    return f"{_second(seconds)}.{f'{fraction:06d}'.rstrip('0')}Z"


_dump = json.JSONEncoder(ensure_ascii=False).encode
# Go's encoder escapes these in every string; none can occur outside a JSON string, so the
# whole body is escaped at once.
_GO_ESCAPES: Final = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


# Go encodes each row as a map: keys in sorted order. One %-template per row; the database
# encoded every value but the times. Stored JSON text (validated when written) is embedded
# as it is: parsed, it gives the same values Go's parse-and-re-encode does, without its
# int64 rounding.
_SORTED: Final = sorted((name, index) for index, (name, _) in enumerate(COLUMNS))
_ROW: Final = "{" + ",".join(f"{encode_basestring(name)}:%s" for name, _ in _SORTED) + "}"
_ORDER: Final = tuple(index for _, index in _SORTED)
_TIMES: Final = tuple(index for index, (_, kind) in enumerate(COLUMNS) if kind == _TIME)


def _encoded(row: Sequence[Any]) -> str:
    values = list(row)
    for index in _TIMES:
        values[index] = f'"{rfc3339(int(row[index]))}"'
    return _ROW % tuple([values[index] for index in _ORDER])


def render_spans(rows: Sequence[Sequence[Any]]) -> bytes:
    """The JSON array of row objects the Go API returns for `rows` (in `COLUMNS` order)."""
    return ("[" + ",".join(map(_encoded, rows)) + "]").translate(_GO_ESCAPES).encode()


def render_names(rows: Sequence[Sequence[Any]]) -> bytes:
    """The JSON array of strings `span-service-names` returns."""
    return _dump([row[0] for row in rows]).translate(_GO_ESCAPES).encode()
