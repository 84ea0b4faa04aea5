"""The backend's SQL database: table layout shared with the Go backend, engine set-up.

The tables keep the Go backend's layout column for column, so a database file written by
the Go backend opens as it is, and `create_all` leaves existing tables alone.

A SQLite file may be replaced under a running server (a backup restored): `SqliteFileWatch`
reopens the pool when the file at the path changes, and after start-up `open_database`'s
engine never creates the file (docs/design/sqlite-file-watch.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiosqlite
from sqlalchemy import (
    BigInteger,
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
from sqlalchemy.exc import DisconnectionError, InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import asbool

from junjo_backend.failures import describe_error

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

log = logging.getLogger(__name__)

_T = TypeVar("_T")

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

# One row (id = 1): the poller's fencing token (poller/leadership.py). A table of its own, so that
# poller_state keeps the Go backend's layout; the Go backend never reads it.
poller_leadership = Table(
    "poller_leadership",
    metadata,
    Column("id", Integer, CheckConstraint("id = 1"), primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),
    Column("holder", Text, nullable=False),
)

# PostgreSQL only: the leader's lease (poller/leadership.py), renewed by the database's clock.
poller_lease = Table(
    "poller_lease",
    metadata,
    Column("id", Integer, CheckConstraint("id = 1"), primary_key=True, autoincrement=False),
    Column("holder", Text, nullable=False),  # the leader's session_name()
    Column("renewed_at", DateTime(timezone=True), nullable=False),
)

# Told apart from a restarted process with the same host name and pid (pid 1 in containers).
_PROCESS_TOKEN = secrets.token_hex(4)


def session_name() -> str:
    """The `application_name` of every PostgreSQL session this process opens.

    A standby that takes over from a frozen leader ends every session carrying the leader's
    name (poller/leadership.py); it also tells operators whose session is whose. At most 63
    bytes (PostgreSQL's NAMEDATALEN).
    """
    return f"junjo {socket.gethostname()[:32]}:{os.getpid()}:{_PROCESS_TOKEN}"


# The Go backend's pragmas. API keys are few, small and precious: every commit is fsynced
# (synchronous=FULL). journal_mode=DELETE keeps the database in one file between writes:
# a copy of it is a whole backup, and a copy restored over it in place is seen by every
# open connection (rollback mode checks the header's change counter at each transaction),
# where WAL mode would leave a -wal and -shm beside it that belong to the old file.
# busy_timeout makes readers and writers wait for a lock instead of failing.
_SQLITE_PRAGMAS = (
    # First: the pragmas after it wait for a lock too, and until it runs sqlite3's own
    # 5 s default applies.
    "PRAGMA busy_timeout=10000",
    "PRAGMA journal_mode=DELETE",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)

# What the header of a SQLite file starts with, and where its change counter sits (a
# 4-byte big-endian count of committed writes, rollback mode).
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CHANGE_COUNTER = slice(24, 28)
_HEADER_BYTES = 100
# How long a failed connect waits for aiosqlite's worker thread to end.
_THREAD_STOP_SECONDS = 5.0
# conn_rec.info key: the file a pooled connection opened.
_OPENED_FILE = "junjo_sqlite_file"


@dataclass(frozen=True, slots=True)
class _FileState:
    """The file at the watched path: which file it is, and its change counter if it has one."""

    device: int
    inode: int
    change_counter: int | None  # None: not (yet) a SQLite database (garbage, empty, torn)

    @property
    def identity(self) -> tuple[int, int]:
        return self.device, self.inode


class SqliteFileWatch:
    """Ties each pooled SQLite connection to the file it opened; reopens them when it changes.

    Checked at every checkout: no file at the path fails the checkout; another file, or the
    same one rewritten in place, reopens every pooled connection. Each change is logged once,
    at WARNING. The header is read through one descriptor kept open per file, never one per
    look (SQLite's POSIX locks): docs/design/sqlite-file-watch.md.
    """

    def __init__(self, path: Path, *, create_missing: bool) -> None:
        self._path = path
        self._create_missing = create_missing
        self._last: _FileState | None = None
        self._missing = False
        self._unreadable = False  # said once, until the file can be read again
        self._fd: int | None = None
        self._fd_identity: tuple[int, int] | None = None

    def attach(self, engine: AsyncEngine) -> None:
        """Install the watch on `engine`'s pool (connect, and checkout)."""
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "do_connect", self._on_do_connect)
        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "engine_disposed", self._on_disposed)

    def _on_disposed(self, _engine: object) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._fd_identity = None, None

    def _state(self) -> _FileState | None:
        identity = self._identity()
        if identity is None:
            self._close_fd()  # its file is gone from the path: its locks no longer matter
            return None
        if self._fd is None or self._fd_identity != identity:
            self._close_fd()
            try:
                fd = os.open(self._path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            stat = os.fstat(fd)  # the file opened, should it have changed since the stat
            self._fd, self._fd_identity = fd, (stat.st_dev, stat.st_ino)
            identity = self._fd_identity
        header = os.pread(self._fd, _HEADER_BYTES, 0)
        counter = None
        if not header:  # an empty file is an empty database to SQLite (no write yet)
            counter = 0
        elif len(header) == _HEADER_BYTES and header.startswith(_SQLITE_MAGIC):
            counter = int.from_bytes(header[_CHANGE_COUNTER], "big")
        return _FileState(identity[0], identity[1], counter)

    def _identity(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _on_do_connect(
        self,
        _dialect: Dialect,
        record: ConnectionPoolEntry,
        cargs: list[Any],
        cparams: dict[str, Any],
    ) -> None:
        record.info[_OPENED_FILE] = self._identity()
        cparams["async_creator_fn"] = _connect_aiosqlite
        # Every connection opens the file this watch looks at, whatever the URL's spelling
        # (sqlite_database): mode=rw opens it read-write and fails when it does not exist.
        mode = "rwc" if self._create_missing else "rw"
        cargs[0] = f"file:{quote(str(self._path))}?mode={mode}"
        cparams["uri"] = True

    def _on_connect(self, _dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        # SQLite opened the file between the two looks; if they differ, it is unknown which
        # file the connection holds, and its first checkout replaces it.
        if record.info.get(_OPENED_FILE) != self._identity():
            record.info[_OPENED_FILE] = None

    def _on_checkout(
        self,
        _dbapi_connection: DBAPIConnection,
        record: ConnectionPoolEntry,
        _proxy: PoolProxiedConnection,
    ) -> None:
        try:
            state = self._state()
        except OSError as exc:
            self._note_unreadable(exc)
            return
        self._unreadable = False
        if state is None:
            if not self._missing:
                self._missing = True
                log.warning(
                    "the SQLite database file is missing; every query fails until it is back "
                    "(the server does not create it)",
                    extra={"path": str(self._path)},
                )
            raise DisconnectionError("the SQLite database file is missing")
        replaced = self._note(state)
        if replaced or record.info.get(_OPENED_FILE) != state.identity:
            # Every connection opened before now is reopened at its next checkout; this one
            # is reopened at once (and checked again).
            raise InvalidatePoolError("the SQLite database file was replaced")

    def _note_unreadable(self, exc: OSError) -> None:
        # Safe to let the checkout go on: SQLite opens the file itself and fails the query
        # with its own reason; only the check for a replaced file is skipped meanwhile.
        if not self._unreadable:
            self._unreadable = True
            log.warning(
                "cannot read the SQLite database file to check whether it was replaced; "
                "SQLite reports what is wrong with it",
                extra={"path": str(self._path), "error": describe_error(exc)},
            )

    def _note(self, state: _FileState) -> bool:
        """Record the file's state; whether it was replaced since the last look (logged once)."""
        last, was_missing = self._last, self._missing
        self._last, self._missing = state, False
        if last is None and not was_missing:
            return False
        how = None
        if was_missing or last is None:
            how = "a file is back at its path"
        elif state.identity != last.identity:
            how = "another file at its path"
        elif state.change_counter is None:
            if last.change_counter is not None:
                log.warning(
                    "the SQLite database file no longer holds a database (overwritten in place?)",
                    extra={"path": str(self._path)},
                )
            return False
        elif last.change_counter is None or state.change_counter < last.change_counter:
            how = "rewritten in place"
        if how is None:
            return False
        log.warning(
            "the SQLite database file was replaced; reopening every database connection",
            extra={"path": str(self._path), "how": how},
        )
        return True


@dataclass(slots=True)
class _Turn:
    """One piece of work in a `SerialQueries` lane; `abandoned` once its caller stopped waiting."""

    abandoned: bool = False


class SerialQueries:
    """Database work run one piece at a time, each caller waiting at most its own timeout.

    A SQLite query that waits for another process's lock waits in aiosqlite's thread, where
    a cancel cannot reach it, and closing its connection queues behind it: a caller that
    cancels at its timeout still waits for SQLite's busy timeout (issue 20: 4.7 s for a 2 s
    key-read timeout, over 10 s for a 1 s `/health` probe). Here each piece runs in a task
    of its own: the caller gets `TimeoutError` at its timeout, and the work ends on its own
    (its result dropped). A piece starts once the one before it has ended, so abandoned work
    cannot pile up and take every pooled connection; a piece whose caller gave up before its
    turn never runs.
    """

    def __init__(self) -> None:
        self._last: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Callable[[], Awaitable[_T]], within: float) -> _T:
        """`work()`'s result; TimeoutError when it has not finished `within` seconds."""
        turn = _Turn()
        task = asyncio.create_task(self._in_turn(self._last, work, turn), name="database-work")
        self._last = task
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(task)
        except TimeoutError:
            raise TimeoutError(f"no answer within {within:g} s") from None
        finally:
            turn.abandoned = True  # harmless once the work has run

    @staticmethod
    async def _in_turn(
        previous: asyncio.Task[Any] | None, work: Callable[[], Awaitable[_T]], turn: _Turn
    ) -> _T:
        if previous is not None:
            await asyncio.wait([previous])
        if turn.abandoned:
            raise TimeoutError("given up before its turn")
        return await work()

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its caller saw it, or gave up on it (then a later piece reports the cause).
            log.debug("database work failed", extra={"error": type(task.exception()).__name__})

    async def close(self) -> None:
        """Cancel the work under way and queued (a query already in SQLite still ends first)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def is_sqlite(engine: AsyncEngine) -> bool:
    """Whether the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


async def _connect_aiosqlite(database: str, **kwargs: Any) -> aiosqlite.Connection:  # noqa: ANN401 (sqlite3.connect's keywords)
    """aiosqlite.connect, but a failed connect waits for its worker thread to end.

    aiosqlite stops the thread of a connection that failed to open without waiting for
    it, and the thread then calls back into the event loop; when that loop has closed
    meanwhile (a CLI command that failed at once), the thread dies with a traceback.
    """
    connection = aiosqlite.connect(database, **kwargs)
    connection._thread.daemon = True  # noqa: SLF001 (as SQLAlchemy's own aiosqlite dialect does)
    try:
        return await connection
    except BaseException:
        await asyncio.to_thread(connection._thread.join, _THREAD_STOP_SECONDS)  # noqa: SLF001
        raise


class UnsupportedDatabaseUrl(ValueError):  # noqa: N818 (reads as the condition it reports)
    """A SQLite URL whose spelling the backend refuses; the message (one line) says why.

    The message never repeats the URL (another database's URL can carry a password).
    """


@dataclass(frozen=True, slots=True)
class SqliteFile:
    """The SQLite database file a URL names (see `sqlite_database`)."""

    path: Path  # absolute; a symlink is kept, and followed at every open and every look
    create: bool  # False when a `file:` URI says mode=rw: not even the first start makes it

    @property
    def real_path(self) -> Path:
        """The file itself, every symlink resolved: what replicas agree on (the leader lock)."""
        return self.path.resolve()


# What SQLAlchemy's SQLite dialects take from the URL's query for `sqlite3.connect` itself;
# the rest of the query is SQLite's own URI parameters (https://sqlite.org/uri.html).
_DRIVER_ARGS = frozenset(
    {"uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
# The SQLite URI parameters accepted, and the values of each. `mode` only decides whether
# the first start may create the file; every open after that is read-write and never creates.
_URI_PARAMETERS = {"mode": frozenset({"rw", "rwc"}), "cache": frozenset({"private"})}
_URI_REFUSED = {
    ("mode", "ro"): "mode=ro: the backend writes to this database (its checkpoint, and the "
    "key commands)",
    ("cache", "shared"): "cache=shared: the pooled connections would lock each other out "
    "of tables, which SQLite's busy timeout does not wait for",
}
_NO_MEMORY = (
    "an in-memory SQLite database belongs to one process: keys made by `junjo-backend "
    "api-keys create` would never reach the server; name a file "
    "(sqlite+aiosqlite:///data/junjo.db)"
)
_PLAIN_PATH_HINT = "name the file by a plain path (sqlite+aiosqlite:////abs/path/junjo.db)"


def sqlite_database(database_url: str) -> SqliteFile | None:
    """The file a SQLite URL names, however it is spelt; None for another database.

    The one place that answers "which file": the engine (which opens exactly that file),
    its file watch, the leader lock, the CLI's checks and labels all ask it. A plain path
    (relative to the working folder, `~` expanded) and a `file:` URI with `uri=true`
    (`file:/abs`, `file:rel`, `file:///abs`, `file://localhost/abs`) name a file. Spellings
    that cannot name one file every process agrees on raise `UnsupportedDatabaseUrl`: an
    in-memory database, `vfs=`, `immutable=`, `nolock=`, `mode=ro`, `cache=shared`, another
    SQLite parameter, SQLite parameters without `uri=true` (SQLAlchemy would drop them), a
    `file:` URI without `uri=true`, and a `file:` path that still holds `%`, `?` or `#`
    once SQLAlchemy has decoded it (SQLite would decode it a second time).
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    query = dict(url.query)
    repeated = sorted(name for name, value in query.items() if isinstance(value, tuple))
    if repeated:
        raise UnsupportedDatabaseUrl(f"the query parameter {repeated[0]!r} is given twice")
    try:
        uri = asbool(query.get("uri", False))
    except ValueError:
        raise UnsupportedDatabaseUrl("uri= must be true or false") from None
    parameters = {name: str(value) for name, value in query.items() if name not in _DRIVER_ARGS}
    database = url.database or ""
    is_file_uri = uri and database.startswith("file:")
    if parameters and not is_file_uri:
        names = ", ".join(sorted(parameters))
        raise UnsupportedDatabaseUrl(
            f"SQLite URI parameters ({names}) take effect only in a file: URI with uri=true "
            "(sqlite+aiosqlite:///file:/path/junjo.db?uri=true); here they would be ignored"
        )
    if database.lower().startswith("file:") and not is_file_uri:
        raise UnsupportedDatabaseUrl(
            "a file: URI needs ?uri=true (without it, 'file:' would be a folder name)"
        )
    path_text = _file_uri_path(database.removeprefix("file:")) if is_file_uri else database
    if path_text in {"", ":memory:"}:
        raise UnsupportedDatabaseUrl(_NO_MEMORY)
    may_create = [_check_uri_parameter(name, value) for name, value in parameters.items()]
    create = all(may_create)
    path = Path(path_text)
    if not is_file_uri:
        path = path.expanduser()  # SQLite itself expands nothing in a URI
    return SqliteFile(path.absolute(), create=create)


def _file_uri_path(rest: str) -> str:
    """The path of a `file:` URI (after `file:`), as SQLite reads it."""
    if any(mark in rest for mark in "%?#"):
        raise UnsupportedDatabaseUrl(
            "the file: URI's path holds '%', '?' or '#' once SQLAlchemy has decoded it, and "
            f"SQLite would decode it again; {_PLAIN_PATH_HINT}"
        )
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority not in {"", "localhost"}:
            raise UnsupportedDatabaseUrl(
                "a file: URI names a file on this host: its authority must be empty or 'localhost'"
            )
        return slash + path
    return rest


def _check_uri_parameter(name: str, value: str) -> bool:
    """Refuse a SQLite URI parameter we do not keep our guarantees under; whether it may create."""
    if name == "mode" and value == "memory":
        raise UnsupportedDatabaseUrl(_NO_MEMORY)
    refused = _URI_REFUSED.get((name, value))
    if refused is None and value not in _URI_PARAMETERS.get(name, frozenset()):
        refused = (
            f"the SQLite URI parameter {name}={value} is not supported (accepted: mode=rw, "
            "mode=rwc, cache=private); vfs=, immutable= and nolock= would hide changes "
            "other processes make (a revoked key) from the server"
        )
    if refused is not None:
        raise UnsupportedDatabaseUrl(refused)
    return not (name == "mode" and value == "rw")


def sqlite_file(database_url: str) -> Path | None:
    """The absolute path of the SQLite file a URL names; None for another database.

    See `sqlite_database` (which spellings name a file, which are refused).
    """
    database = sqlite_database(database_url)
    return None if database is None else database.path


def write_access_problem(path: Path) -> str | None:
    """Why this process could not write a database file at `path`, or None.

    Checked before SQLite is asked, whose own answer is only "unable to open database
    file". Writing needs the file (when it exists) and its folder (SQLite writes a
    `-journal` beside the file at every write; a missing folder is made in the nearest one
    that exists). The image runs as uid 10001, while a folder bind-mounted from the host
    often belongs to root: the message names the folder, the uid and the fixes.
    """
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return None  # a file stands where a folder must be: the create step names it
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return _not_writable("the database file", path, folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        return _not_writable("the folder", folder, folder)
    return None


def _not_writable(what: str, where: Path, folder: Path) -> str:
    uid = os.geteuid()
    try:
        info = where.stat()
        owner = f"owner uid {info.st_uid}, mode {info.st_mode & 0o7777:o}"
        run_as = f"--user {info.st_uid}"
    except OSError:
        owner, run_as = "its owner is not readable", "--user <its owner>"
    return (
        f"{what} {where} is not writable by uid {uid}, which this process runs as ({owner}); "
        f"give it to this uid (`chown -R {uid} {folder}`, on the host for a bind mount) or "
        f"run as its owner (`docker run {run_as}`, compose `user:`)"
    )


def sqlite_write_problem(database_url: str) -> str | None:
    """`write_access_problem` for the SQLite file `database_url` names (None: not a file)."""
    path = sqlite_file(database_url)
    return None if path is None else write_access_problem(path)


def database_label(database_url: str) -> str:
    """How to name the database to an operator.

    A SQLite file by its absolute path, anything else by its URL without the password.
    """
    path = sqlite_file(database_url)
    return str(path) if path is not None else make_url(database_url).render_as_string()


def postgres_connect_args(connect_timeout_seconds: float) -> dict[str, Any]:
    """The connect arguments for asyncpg: its connect timeout, and this process's session name."""
    return {
        "timeout": connect_timeout_seconds,
        "server_settings": {"application_name": session_name()},
    }


def create_engine(
    database_url: str, *, create_missing: bool = True, connect_timeout_seconds: float = 10.0
) -> AsyncEngine:
    """An async engine for `database_url`; for a SQLite file, its folder is created.

    With `create_missing=False` (or a `file:` URI saying mode=rw), a SQLite file that does
    not exist is an error rather than a new empty database (and its folder is not created).
    Either way the file `sqlite_database` names is the one opened and watched
    (`SqliteFileWatch`); a spelling it refuses raises `UnsupportedDatabaseUrl`. Opening a
    PostgreSQL connection gives up after `connect_timeout_seconds` (a server that accepts
    connections but never answers).
    """
    url = make_url(database_url)
    # hide_parameters: statement parameters (API keys among them) never reach an error
    # message or a log line.
    if url.get_backend_name() != "sqlite":
        connect_args = (
            postgres_connect_args(connect_timeout_seconds)
            if url.get_driver_name() == "asyncpg"
            else {}
        )
        return create_async_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args
        )
    database = sqlite_database(database_url)
    if database is None:  # pragma: no cover - the dialect is SQLite here
        raise UnsupportedDatabaseUrl("not a SQLite URL")
    create = create_missing and database.create
    if create:
        database.real_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, hide_parameters=True)

    @event.listens_for(engine.sync_engine, "connect")
    def _set_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()

    SqliteFileWatch(database.path, create_missing=create).attach(engine)
    return engine


async def init_schema(engine: AsyncEngine) -> None:
    """Create the tables that do not exist yet; existing (Go-era) tables are kept as they are."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def open_database(database_url: str, *, connect_timeout_seconds: float = 10.0) -> AsyncEngine:
    """The server's engine: never creates a SQLite file, once the schema is in place.

    The schema is created first if needed (so the first start creates the file), through
    an engine of its own that is then closed.
    """
    setup = create_engine(database_url, connect_timeout_seconds=connect_timeout_seconds)
    try:
        await init_schema(setup)
    finally:
        await setup.dispose()
    return create_engine(
        database_url, create_missing=False, connect_timeout_seconds=connect_timeout_seconds
    )


async def close_engine(engine: AsyncEngine, *, quiet: bool = False) -> None:
    """Let SQLite refresh its query planner statistics, then release every connection.

    `PRAGMA optimize` is what SQLite advises running before a connection closes; it waits
    for the database's lock like any query. `quiet` (a CLI command, which has already
    reported any database error in one line) logs a failure at DEBUG only.
    """
    if is_sqlite(engine):
        try:
            async with engine.connect() as conn:
                await conn.execute(text("PRAGMA optimize"))
        except Exception as exc:
            if quiet:
                log.debug("SQLite PRAGMA optimize on close failed", exc_info=True)
            else:
                log.warning(
                    "SQLite PRAGMA optimize on shutdown failed",
                    extra={"error": describe_error(exc)},
                )
    await engine.dispose()
