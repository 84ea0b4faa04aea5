"""What each read route selects, orders and limits, on both stores, over rows made here
(the golden store has too few rows, and too many equal times, to show it)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import TYPE_CHECKING, Any

import duckdb
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from junjo_backend.database import close_engine, create_engine
from junjo_backend.settings import Settings
from junjo_backend.span_api import install_span_api
from junjo_backend.store.api import DuckDBReader, PostgresReader, SpanReader, rfc3339

from .golden_api import expected_rows, fill_duckdb, fill_postgres

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

BASE = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
ROOTS = 503  # more than the routes' limit of 500
MARKUP = '<b>"a" & b</b>\u2028'


def _time(seconds: float) -> str:
    return (BASE + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _row(trace: int, span: int, **values: Any) -> dict[str, Any]:
    template = dict(expected_rows()[0])
    template.update(
        trace_id=f"{trace:032x}",
        span_id=f"{span:016x}",
        parent_span_id=None,
        service_name="svc-many",
        name=f"span-{trace}-{span}",
        start_time=_time(trace + span / 1000),
        end_time=_time(trace + span / 1000 + 0.5),
    )
    template.update(values)
    return template


def _rows() -> list[dict[str, Any]]:
    rows = [_row(trace, 0) for trace in range(ROOTS)]
    # Trace 7's children, at distinct times; one of them is an LLM span.
    rows += [_row(7, span, parent_span_id=f"{0:016x}") for span in range(1, 6)]
    rows.append(
        _row(
            11,
            1,
            parent_span_id=f"{0:016x}",
            service_name="svc-other",  # the LLM span may be in another service
            attributes_json='{"openinference.span.kind":"LLM"}',
        )
    )
    rows += [
        _row(1000 + n, 0, service_name="svc-wf", junjo_span_type="workflow") for n in range(600)
    ]
    rows.append(_row(5000, 0, service_name="svc-wf", junjo_span_type="node"))
    rows.append(_row(5001, 0, service_name="UPPER"))  # before "svc" bytewise, after in en-US
    rows.append(
        _row(
            6000,
            0,
            service_name="svc-markup",
            name=MARKUP,
            junjo_wf_state_start=json.dumps({"html": MARKUP}, ensure_ascii=False),
            start_time="1970-01-01T00:00:00.000000Z",
            end_time="1970-01-01T00:00:01.500000Z",
        )
    )
    return rows


@pytest.fixture
def duckdb_reader(tmp_path: Path) -> Iterator[SpanReader]:
    path = tmp_path / "otel_data.db"
    fill_duckdb(path, _rows())
    with contextlib.closing(duckdb.connect(str(path))) as conn:
        yield DuckDBReader(conn.cursor)


@pytest.fixture
async def postgres_reader(postgres_url: str) -> AsyncIterator[SpanReader]:
    await fill_postgres(postgres_url, _rows())
    engine = create_engine(postgres_url)
    async with engine.begin() as conn:
        # A collation that sorts otherwise than bytewise, as a database's default may.
        await conn.execute(
            text('ALTER TABLE spans ALTER COLUMN service_name TYPE text COLLATE "und-x-icu"')
        )
    try:
        yield PostgresReader(engine)
    finally:
        await close_engine(engine)


@pytest.fixture(params=["duckdb", "postgres"])
def reader(request: pytest.FixtureRequest) -> SpanReader:
    found = request.getfixturevalue(f"{request.param}_reader")
    assert isinstance(found, DuckDBReader | PostgresReader)
    return found


@pytest.fixture
async def client(reader: SpanReader) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    install_span_api(app, Settings(_env_file=None), lambda _request: reader)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def _names(client: httpx.AsyncClient, route: str) -> list[str]:
    response = await client.get(route)
    assert response.status_code == 200, response.text
    return [row["name"] for row in response.json()]


async def test_root_spans_are_the_newest_500_roots(client: httpx.AsyncClient) -> None:
    names = await _names(client, "/otel/service/svc-many/root-spans")
    assert names == [f"span-{trace}-0" for trace in range(ROOTS - 1, ROOTS - 501, -1)]


async def test_filtered_roots_are_those_of_traces_with_an_llm_span(
    client: httpx.AsyncClient,
) -> None:
    assert await _names(client, "/otel/service/svc-many/root-spans-filtered") == ["span-11-0"]
    assert await _names(client, "/otel/service/svc-other/root-spans-filtered") == []


async def test_nested_spans_are_the_trace_newest_first(client: httpx.AsyncClient) -> None:
    names = await _names(client, f"/otel/trace/{7:032x}/nested-spans")
    assert names == [f"span-7-{span}" for span in range(5, -1, -1)]


async def test_workflow_spans_have_no_limit(client: httpx.AsyncClient) -> None:
    names = await _names(client, "/otel/spans/type/workflow/svc-wf")
    assert names == [f"span-{1000 + n}-0" for n in range(599, -1, -1)]


async def test_service_names_are_distinct_in_bytewise_order(client: httpx.AsyncClient) -> None:
    response = await client.get("/otel/span-service-names")
    assert response.json() == ["UPPER", "svc-many", "svc-markup", "svc-other", "svc-wf"]


async def test_markup_is_escaped_as_go_escapes_it(client: httpx.AsyncClient) -> None:
    response = await client.get("/otel/service/svc-markup/root-spans")
    escaped = '\\u003cb\\u003e\\"a\\" \\u0026 b\\u003c/b\\u003e\\u2028'
    assert response.text.count(escaped) == 2  # the name, and inside the embedded state JSON
    assert not {"<", ">", "&", "\u2028"} & set(response.text)
    [row] = response.json()
    assert row["name"] == MARKUP
    assert row["junjo_wf_state_start"] == {"html": MARKUP}
    assert (row["start_time"], row["end_time"]) == (
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:01.5Z",
    )


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_500_000, "1970-01-01T00:00:01.5Z"),
        (-1, "1969-12-31T23:59:59.999999Z"),
        (1_700_000_000_123_450, "2023-11-14T22:13:20.12345Z"),
        (-(2**63) // 1000, "1677-09-21T00:12:43.145224Z"),
    ],
)
def test_times_are_rfc3339_with_trailing_zeros_trimmed(micros: int, text: str) -> None:
    assert rfc3339(micros) == text
