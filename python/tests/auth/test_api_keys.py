"""The key store: generation, create/list/revoke on a real SQLite file, Go-era files."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import string
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from junjo_backend.auth.key_store import (
    KEY_LENGTH,
    ApiKeyStoreError,
    create_api_key,
    generate_api_key,
    key_fingerprint,
    list_api_keys,
    new_key_id,
    revoke_api_key,
)
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.failures import describe_error

from .auth_calls import auth_stub, validate

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.auth.key_store import NewApiKey
    from junjo_backend.settings import Settings

    from .auth_calls import KeyRegistry

    MakeKey = Callable[..., Awaitable[NewApiKey]]

# The Go backend's DDL, verbatim (docs/go-contract.md).
GO_API_KEYS_DDL = (
    "CREATE TABLE api_keys (id TEXT PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
    "name TEXT NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
)
GO_POLLER_STATE_DDL = (
    "CREATE TABLE poller_state (id INTEGER PRIMARY KEY CHECK (id = 1), last_key BLOB)"
)
ANY_KEY = re.compile(r"[0-9A-Za-z]{64}")


def test_generated_keys_are_64_characters_of_the_go_alphabet_and_never_repeat() -> None:
    keys = {generate_api_key() for _ in range(2000)}
    assert len(keys) == 2000
    allowed = set(string.ascii_letters + string.digits)
    assert all(len(k) == KEY_LENGTH and set(k) <= allowed for k in keys)
    # Every character of the alphabet shows up: the choice is not from a narrow subset.
    assert set("".join(keys)) == allowed


def test_key_ids_are_url_safe_unique_and_never_read_as_an_option() -> None:
    ids = {new_key_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", key_id) for key_id in ids)


def test_a_fingerprint_is_stable_short_and_reveals_nothing_of_the_key() -> None:
    key = generate_api_key()
    fingerprint = key_fingerprint(key)
    assert fingerprint == key_fingerprint(key)
    assert fingerprint != key_fingerprint(generate_api_key())
    assert re.fullmatch(r"fp:[0-9a-f]{12}", fingerprint)
    assert not any(key[i : i + 4] in fingerprint for i in range(KEY_LENGTH - 3))


async def test_create_list_revoke(engine: AsyncEngine, used_keys: KeyRegistry) -> None:
    first = await create_api_key(engine, "  first app ")
    second = await create_api_key(engine, "second app")
    used_keys.add(first.key)
    used_keys.add(second.key)
    assert first.name == "first app"
    assert first.id != second.id
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", first.id)
    assert first.created_at.tzinfo is UTC

    listed = await list_api_keys(engine)
    assert [k.id for k in listed] == [first.id, second.id]
    assert listed[0].name == "first app"
    assert listed[0].key_hint == key_fingerprint(first.key)
    assert listed[0].created_at == first.created_at  # stored to the microsecond
    assert not any(first.key in repr(k) or second.key in repr(k) for k in listed)

    assert await revoke_api_key(engine, first.id) is True
    assert await revoke_api_key(engine, first.id) is False
    assert [k.id for k in await list_api_keys(engine)] == [second.id]


async def test_a_key_needs_a_name(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="name"):
        await create_api_key(engine, "   ")
    assert await list_api_keys(engine) == []


async def test_a_failed_insert_reports_the_driver_error_and_never_the_key(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON api_keys "
                "BEGIN SELECT RAISE(ABORT, 'inserts refused'); END"
            )
        )
    with pytest.raises(ApiKeyStoreError) as failure:
        await create_api_key(engine, "refused")
    message = str(failure.value)
    assert "inserts refused" in message
    assert not ANY_KEY.search(message)
    # The SQLAlchemy error (whose text carries the INSERT's parameters) is not chained
    # into tracebacks.
    assert failure.value.__suppress_context__ is True
    assert failure.value.__cause__ is None
    assert not any(ANY_KEY.search(r.getMessage()) for r in caplog.records)


async def test_list_and_revoke_report_a_missing_table(settings: Settings) -> None:
    engine = create_engine(settings.database_url)  # no schema
    try:
        with pytest.raises(ApiKeyStoreError, match="no such table"):
            await list_api_keys(engine)
        with pytest.raises(ApiKeyStoreError, match="no such table"):
            await revoke_api_key(engine, "some-id")
    finally:
        await close_engine(engine)


def test_database_errors_are_described_without_statement_parameters() -> None:
    secret = generate_api_key()
    statement_error = OperationalError(
        "INSERT INTO api_keys VALUES (?)", (secret,), sqlite3.OperationalError("locked")
    )
    assert secret in str(statement_error)  # what the description must avoid
    assert describe_error(statement_error) == "OperationalError: locked"
    assert describe_error(SQLAlchemyError("anything")) == "SQLAlchemyError"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(OSError("disk full")) == "OSError: disk full"


def _go_era_file(path: Path, rows: list[tuple[str, str, str, str | None]]) -> None:
    """A database file as the Go backend left it: its DDL, its journal mode, plain sqlite3."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(GO_API_KEYS_DDL)
        db.execute(GO_POLLER_STATE_DDL)
        for key_id, key, name, created_at in rows:
            if created_at is None:
                db.execute(
                    "INSERT INTO api_keys (id, key, name) VALUES (?, ?, ?)", (key_id, key, name)
                )
            else:
                db.execute(
                    "INSERT INTO api_keys (id, key, name, created_at) VALUES (?, ?, ?, ?)",
                    (key_id, key, name, created_at),
                )
    # `with` commits but does not close.
    sqlite3.connect(path).close()


async def test_a_go_era_database_file_opens_lists_and_validates_its_keys(
    settings: Settings, used_keys: KeyRegistry
) -> None:
    database = make_url(settings.database_url).database
    assert database is not None
    path = Path(database)
    go_keys = [used_keys.add(generate_api_key()) for _ in range(4)]
    _go_era_file(
        path,
        [
            ("V1StGXR8_Z5jdHi6B-myT", go_keys[0], "defaulted", None),
            # How Go's mattn/go-sqlite3 writes a time.Time.
            ("b2", go_keys[1], "go driver", "2024-05-06 07:08:09.123456789+02:00"),
            ("c3", go_keys[2], "go string", "2024-05-06 07:08:09.5 -0300 BRT"),
            ("d4", go_keys[3], "unreadable date", "yesterday"),
        ],
    )
    engine = create_engine(settings.database_url)
    try:
        await init_schema(engine)  # must leave the Go tables as they are
        listed = {k.name: k for k in await list_api_keys(engine)}
        assert set(listed) == {"defaulted", "go driver", "go string", "unreadable date"}
        assert listed["go driver"].created_at == datetime(2024, 5, 6, 5, 8, 9, 123456, UTC)
        assert listed["go string"].created_at == datetime(2024, 5, 6, 10, 8, 9, 500000, UTC)
        assert listed["defaulted"].created_at.year >= 2024
        assert listed["unreadable date"].created_at == datetime(1970, 1, 1, tzinfo=UTC)
        assert listed["defaulted"].key_hint == key_fingerprint(go_keys[0])

        new = await create_api_key(engine, "python era")
        used_keys.add(new.key)
        server = AuthServer(settings, engine)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = auth_stub(channel)
                for key in [*go_keys, new.key]:
                    assert await validate(stub, key) is True
                assert await validate(stub, used_keys.unknown()) is False
        finally:
            await server.stop(0)
    finally:
        await close_engine(engine)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        ddl = db.execute("SELECT sql FROM sqlite_master WHERE name = 'api_keys'").fetchone()[0]
        count = db.execute("SELECT count(*) FROM api_keys").fetchone()[0]
    assert ddl == GO_API_KEYS_DDL
    assert count == 5


async def test_an_unreadable_created_at_is_logged_without_the_row(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture, used_keys: KeyRegistry
) -> None:
    key = used_keys.add(generate_api_key())
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO api_keys (id, key, name, created_at) VALUES ('x', :k, 'n', :c)"),
            {"k": key, "c": "not a date"},
        )
        await conn.execute(
            text("INSERT INTO api_keys (id, key, name, created_at) VALUES ('y', :k, 'm', 0)"),
            {"k": used_keys.add(generate_api_key())},
        )
    with caplog.at_level(logging.WARNING, logger="junjo_backend.auth.key_store"):
        listed = await list_api_keys(engine)
    assert [k.created_at for k in listed] == [datetime(1970, 1, 1, tzinfo=UTC)] * 2
    assert any("created_at" in r.getMessage() for r in caplog.records)
    assert all(key not in r.getMessage() for r in caplog.records)
