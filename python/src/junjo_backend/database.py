"""The backend's SQL database: table layout shared with the Go backend, engine set-up.

The tables keep the Go backend's layout column for column, so a database file written by
the Go backend opens as it is, and `create_all` leaves existing tables alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    event,
    func,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)

# aiosqlite logs every statement it runs, parameters included, at DEBUG: with the root
# logger at DEBUG that would print each new API key. Like SQLAlchemy does for its own
# loggers, quieten it unless someone configured it on purpose.
_aiosqlite_log = logging.getLogger("aiosqlite")
if _aiosqlite_log.level == logging.NOTSET:
    _aiosqlite_log.setLevel(logging.INFO)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key", Text, nullable=False, unique=True),
    Column("name", Text, nullable=False),
    Column("created_at", DateTime, nullable=False, server_default=func.current_timestamp()),
)

# One row (id = 1): the key of the last WAL entry whose batch the poller has processed.
poller_state = Table(
    "poller_state",
    metadata,
    Column("id", Integer, CheckConstraint("id = 1"), primary_key=True, autoincrement=False),
    Column("last_key", LargeBinary),
)

# API keys are few, small and precious: every commit is fsynced (synchronous=FULL). WAL
# journaling lets the auth server keep reading while the CLI or the poller writes, and
# busy_timeout makes a writer wait for the lock instead of failing with "database is
# locked". The Go backend used journal_mode=DELETE; both are the same file format.
_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)


def is_sqlite(engine: AsyncEngine) -> bool:
    """Whether the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def sqlite_file(database_url: str) -> Path | None:
    """The absolute path of the SQLite file `database_url` names; None for other databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).expanduser().absolute()


def database_label(database_url: str) -> str:
    """How to name the database to an operator.

    A SQLite file by its absolute path, anything else by its URL without the password.
    """
    path = sqlite_file(database_url)
    return str(path) if path is not None else make_url(database_url).render_as_string()


def create_engine(
    database_url: str, *, connect_timeout_seconds: float = 10.0, create_folder: bool = True
) -> AsyncEngine:
    """An async engine for `database_url`.

    For a SQLite file, its folder is created unless `create_folder` is false. Opening a
    connection gives up after `connect_timeout_seconds` (a PostgreSQL server that accepts
    connections but never answers).
    """
    url = make_url(database_url)
    # hide_parameters: statement parameters (API keys among them) never reach an error
    # message or a log line.
    if url.get_backend_name() != "sqlite":
        connect_args = (
            {"timeout": connect_timeout_seconds} if url.get_driver_name() == "asyncpg" else {}
        )
        return create_async_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args
        )
    path = sqlite_file(database_url)
    if path is not None and create_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, hide_parameters=True)

    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()

    return engine


async def init_schema(engine: AsyncEngine) -> None:
    """Create the tables that do not exist yet; existing (Go-era) tables are kept as they are."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def close_engine(engine: AsyncEngine, *, quiet: bool = False) -> None:
    """Fold SQLite's WAL back into the database file, then release every connection.

    `quiet` (a CLI command, which has already reported any database error in one line)
    logs a failed checkpoint at DEBUG only.
    """
    if is_sqlite(engine):
        try:
            async with engine.connect() as conn:
                await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        except Exception as exc:  # shutting down: report and still dispose
            if quiet:
                log.debug("SQLite WAL checkpoint on close failed", exc_info=True)
            else:
                log.warning(
                    "SQLite WAL checkpoint on shutdown failed",
                    extra={"error": describe_database_error(exc)},
                )
    await engine.dispose()


def describe_database_error(exc: BaseException) -> str:
    """A loggable description of a database failure that carries no statement parameters.

    str() of a SQLAlchemy statement error includes the parameters, which for an INSERT
    into api_keys is the new key; the driver's own message (`orig`) does not.
    """
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    if isinstance(exc, SQLAlchemyError):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
