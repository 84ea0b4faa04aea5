"""The read API over the golden store: what the Go backend's routes returned, on DuckDB and
on PostgreSQL (golden/expected-api.jsonl)."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import duckdb
import httpx
import pytest
from fastapi import FastAPI

from junjo_backend.database import close_engine, create_engine
from junjo_backend.settings import Settings
from junjo_backend.span_api import install_span_api
from junjo_backend.store.api import DuckDBReader, PostgresReader, SpanReader

from .golden_api import (
    as_browser_reads,
    assert_same_body,
    expected_routes,
    expected_rows,
    fill_duckdb,
    fill_postgres,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


def _client(reader: SpanReader) -> httpx.AsyncClient:
    app = FastAPI()
    settings = Settings(http_host="127.0.0.1", _env_file=None)
    install_span_api(app, settings, lambda _request: reader)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def duckdb_reader(tmp_path: Path) -> Iterator[SpanReader]:
    path = tmp_path / "otel_data.db"
    fill_duckdb(path, expected_rows())
    with contextlib.closing(duckdb.connect(str(path))) as conn:
        yield DuckDBReader(conn.cursor)


@pytest.fixture
async def postgres_reader(postgres_url: str) -> AsyncIterator[SpanReader]:
    await fill_postgres(postgres_url, expected_rows())
    engine = create_engine(postgres_url)
    try:
        yield PostgresReader(engine)
    finally:
        await close_engine(engine)


@pytest.fixture(params=["duckdb", "postgresql"])
def reader(request: pytest.FixtureRequest) -> SpanReader:
    name = "duckdb_reader" if request.param == "duckdb" else "postgres_reader"
    found = request.getfixturevalue(name)
    assert isinstance(found, DuckDBReader | PostgresReader)
    return found


async def test_every_route_answers_what_the_go_backend_did(reader: SpanReader) -> None:
    routes = expected_routes()
    assert routes[-1][1] == [], "the last golden line is a trace with no spans"
    async with _client(reader) as client:
        for route, want in routes:
            response = await client.get(route)
            assert response.status_code == 200, (route, response.text)
            assert response.headers["content-type"] == "application/json"
            got = as_browser_reads(response.content)
            assert_same_body(route, got, as_browser_reads(json.dumps(want)))


async def test_bodies_escape_as_go_does(reader: SpanReader) -> None:
    async with _client(reader) as client:
        for route, _ in expected_routes():
            body = (await client.get(route)).content
            assert not {b"<", b">", b"&"} & {bytes([c]) for c in body}, route
            assert "\u2028".encode() not in body, route
