"""The read routes' answers to bad input and to a failing or absent store: 400, 404, 500,
503, each with an `{"error": ...}` body that carries no SQL and no credentials."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import duckdb
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from junjo_backend.database import close_engine, create_engine
from junjo_backend.settings import Settings
from junjo_backend.span_api import install_span_api, is_loopback_host
from junjo_backend.store.api import DuckDBReader, PostgresReader, SpanReader, UnavailableReader
from junjo_backend.store.base import StoreUnavailable

from .golden_api import expected_rows, fill_duckdb, fill_postgres

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

TRACE = "0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d"
SPAN = "0d0d0d0d0d0d0d0d"
PASSWORD = "hunter2-not-for-logs"  # noqa: S105 (trust auth ignores it; it must never show)


def _client(reader: SpanReader) -> httpx.AsyncClient:
    app = FastAPI()
    install_span_api(app, Settings(_env_file=None), lambda _request: reader)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    path = tmp_path / "otel_data.db"
    fill_duckdb(path, expected_rows())
    return path


@pytest.fixture
def duckdb_conn(store_file: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    with contextlib.closing(duckdb.connect(str(store_file))) as conn:
        yield conn


@pytest.fixture
async def client(duckdb_conn: duckdb.DuckDBPyConnection) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(DuckDBReader(duckdb_conn.cursor)) as client:
        yield client


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    return body["error"]


@pytest.mark.parametrize(
    "route",
    [
        "/otel/trace/xyz0/nested-spans",  # not hex
        "/otel/trace/0d0/nested-spans",  # odd length
        f"/otel/trace/{'0d' * 128}0d/nested-spans",  # 258 characters
        f"/otel/trace/{TRACE}/span/0d0d-0d0d",
        f"/otel/trace/zz/span/{SPAN}",
        f"/otel/service/{'x' * 1025}/root-spans",
        f"/otel/service/{'é' * 513}/root-spans-filtered",  # 1,026 bytes in 513 characters
        f"/otel/spans/type/workflow/{'x' * 1025}",
        "/otel/service/a%00b/root-spans",
    ],
)
async def test_bad_input_gets_400(client: httpx.AsyncClient, route: str) -> None:
    assert _error(await client.get(route), 400)


async def test_any_even_length_hex_up_to_256_is_an_id(client: httpx.AsyncClient) -> None:
    for trace in ("0d" * 128, "ab", "0101010101010101010101010101010101010101", TRACE.upper()):
        response = await client.get(f"/otel/trace/{trace}/nested-spans")
        assert response.status_code == 200, trace
    upper = await client.get(f"/otel/trace/{TRACE.upper()}/span/{SPAN.upper()}")
    assert [row["name"] for row in upper.json()] == ["span-13"]
    long_name = await client.get(f"/otel/service/{'x' * 1024}/root-spans")
    assert long_name.json() == []


async def test_an_unknown_trace_or_span_is_an_empty_list(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/otel/trace/{'ee' * 16}/nested-spans")).json() == []
    assert (await client.get(f"/otel/trace/{TRACE}/span/{'ee' * 8}")).json() == []
    assert (await client.get("/otel/service/no-such-service/root-spans")).json() == []


async def test_router_errors_under_otel_are_error_bodies(client: httpx.AsyncClient) -> None:
    assert _error(await client.get("/otel/trace//nested-spans"), 404)
    assert _error(await client.post("/otel/span-service-names"), 405)
    assert _error(await client.get("/otel/nothing-here"), 404)
    elsewhere = await client.get("/not-otel")
    assert elsewhere.json() == {"detail": "Not Found"}  # FastAPI's own body outside /otel


async def test_a_dropped_duckdb_table_is_500_without_sql(
    client: httpx.AsyncClient, duckdb_conn: duckdb.DuckDBPyConnection
) -> None:
    duckdb_conn.execute("DROP TABLE state_patches")
    duckdb_conn.execute("DROP TABLE spans")
    for route in ("/otel/span-service-names", f"/otel/trace/{TRACE}/nested-spans"):
        message = _error(await client.get(route), 500)
        assert "SELECT" not in message.upper()
        assert "spans" not in message


@pytest.fixture
async def postgres_with_password(postgres_url: str) -> str:
    # Trust authentication ignores the password; the URL still carries it everywhere.
    return postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


async def test_a_postgresql_error_is_500_without_sql_or_credentials(
    postgres_with_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    await fill_postgres(postgres_with_password, expected_rows())
    engine = create_engine(postgres_with_password)
    try:
        async with _client(PostgresReader(engine)) as client:
            assert (await client.get(f"/otel/trace/{TRACE}/span/{SPAN}")).status_code == 200
            async with engine.begin() as conn:
                await conn.execute(text("DROP TABLE state_patches"))
                await conn.execute(text("DROP TABLE spans"))
            with caplog.at_level(logging.DEBUG):
                response = await client.get("/otel/service/svc-0/root-spans")
    finally:
        await close_engine(engine)
    message = _error(response, 500)
    for leak in ("SELECT", "spans", PASSWORD, "postgres:"):
        assert leak not in message
    assert PASSWORD not in caplog.text
    assert "span query failed" in caplog.text


async def test_a_store_this_process_does_not_hold_is_503_with_the_reason() -> None:
    def not_held() -> duckdb.DuckDBPyConnection:
        raise StoreUnavailable("otel_data.db is held by the poller's leader, pid 4242")

    for reader in (DuckDBReader(not_held), UnavailableReader("spans are not kept here")):
        async with _client(reader) as client:
            for route in ("/otel/span-service-names", f"/otel/trace/{TRACE}/nested-spans"):
                assert _error(await client.get(route), 503) in {
                    "otel_data.db is held by the poller's leader, pid 4242",
                    "spans are not kept here",
                }


async def test_a_store_closed_under_a_read_is_503(store_file: Path) -> None:
    conn = duckdb.connect(str(store_file))
    conn.close()
    async with _client(DuckDBReader(conn.cursor)) as client:
        # A cursor of a closed connection: what a read meets when the leader steps down.
        assert "closed" in _error(await client.get("/otel/span-service-names"), 503)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),  # noqa: S104 (the point of the case)
        ("::", False),
        ("10.1.2.3", False),
        ("example.internal", False),
        ("", False),
    ],
)
def test_which_hosts_are_loopback(host: str, *, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


async def test_postgresql_tables_not_made_yet_are_503_then_a_loss_is_500(
    postgres_url: str,
) -> None:
    # A replica that answers before any leader opened the store: no tables yet.
    engine = create_engine(postgres_url)
    try:
        async with _client(PostgresReader(engine)) as client:
            assert "do not exist yet" in _error(await client.get("/otel/span-service-names"), 503)
            await fill_postgres(postgres_url, expected_rows())
            assert (await client.get("/otel/span-service-names")).status_code == 200
            async with engine.begin() as conn:
                await conn.execute(text("DROP TABLE state_patches"))
                await conn.execute(text("DROP TABLE spans"))
            # Tables that were there and are gone: the database failed, not "not yet".
            assert _error(await client.get("/otel/span-service-names"), 500)
    finally:
        await close_engine(engine)
