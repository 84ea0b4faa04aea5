"""Which replica drains the WAL: a lock that one process holds at a time, and a fencing token.

Every replica on a database serves auth; exactly one, the leader, runs the poller's drain,
and the others try for leadership every `POLLER_LEADER_RETRY_SECONDS`. The lock:
PostgreSQL, a session advisory lock on a connection of its own, with a lease the leader
renews (`poller_lease`, `POLLER_LEADER_LEASE_SECONDS`) so that a frozen leader is taken
over (`PostgresLeadership`); SQLite, `flock` on `.<database file name>.poller-lock` beside
the database (`FileLockLeadership`). A replica that becomes leader bumps the epoch in
`poller_leadership`; `fence`, run last in every checkpoint commit, makes a commit by a
replica that no longer leads roll back. Why, and what it guarantees:
docs/design/leadership.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from junjo_backend.database import (
    poller_leadership,
    poller_lease,
    postgres_connect_args,
    session_name,
    sqlite_file,
)
from junjo_backend.failures import describe_error

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

_LEADERSHIP_ROW = 1
# The advisory lock's two int4 keys: "JUNJ" and the poller. pg_locks shows them as classid
# and objid, with objsubid 2 (the two-key form).
LOCK_CLASS = 0x4A554E4A
LOCK_OBJECT = 1
_TWO_KEY_FORM = 2
# A renewal on the lock connection that takes longer than this counts as a lost connection.
_PING_TIMEOUT_SECONDS = 5.0
# How long a standby waits for the sessions it ended to be gone (pg_terminate_backend's
# timeout, PostgreSQL 14+), so that its next lock try finds the lock free.
_TERMINATE_WAIT_MS = 5000
_RENEWALS_PER_LEASE = 3
# A standby that saw a fresh lease tries again this long after it would run out, so that
# it finds the lease just expired rather than waiting out a whole retry interval past it.
_AFTER_EXPIRY_SECONDS = 0.05


class LeadershipLost(Exception):  # noqa: N818 (a state, as PostgreSQL's own names say)
    """The replica no longer leads: its lock is gone or another replica has bumped the epoch."""


def holder_name() -> str:
    """Who holds leadership, for operators: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PollerLeadership(ABC):
    """Leadership of the drain; `acquire` tries once, `fence` guards each checkpoint commit."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._epoch: int | None = None
        self.lost = asyncio.Event()  # set when held leadership is lost; new at each acquire

    @property
    def held(self) -> bool:
        """Whether this replica leads (the lock is held and was not seen lost)."""
        return self._epoch is not None and not self.lost.is_set()

    async def acquire(self) -> bool:
        """Try once to become leader; True when this replica now leads (epoch bumped)."""
        if self.held:
            return True
        await self.release()
        if not await self._take_lock():
            return False
        try:
            epoch = await self._bump_epoch()
        except BaseException:
            await self.release()
            raise
        self.lost = asyncio.Event()
        self._epoch = epoch
        self._on_acquired()
        return True

    def next_try_in(self, retry_seconds: float) -> float:
        """Seconds until a standby's next try for leadership (at most `retry_seconds`)."""
        return retry_seconds

    async def fence(self, conn: AsyncConnection) -> None:
        """Inside a commit's transaction: raise LeadershipLost unless this replica still leads.

        Run it last before COMMIT: the epoch row it locks keeps a successor's bump waiting
        until the transaction ends, and a lock lost before it fails the transaction.
        """
        epoch = self._epoch
        if epoch is None or self.lost.is_set():
            raise LeadershipLost("this replica is not the leader")
        result = await conn.execute(
            update(poller_leadership)
            .where(poller_leadership.c.id == _LEADERSHIP_ROW, poller_leadership.c.epoch == epoch)
            .values(epoch=poller_leadership.c.epoch)
        )
        if result.rowcount != 1:
            self.lost.set()
            raise LeadershipLost(f"another replica leads now (epoch {epoch} was superseded)")
        await self._fence_lock(conn)

    async def release(self) -> None:
        """Give up leadership (idempotent); a standby can take it at its next try."""
        was_held = self._epoch is not None
        self._epoch = None
        self.lost.set()
        await self._drop_lock()
        if was_held:
            log.info("poller leadership released")

    async def close(self) -> None:
        """Release leadership and whatever holds the lock (at shutdown)."""
        await self.release()

    async def _bump_epoch(self) -> int:
        """Move the epoch on; waits for a commit of the previous leader still under way."""
        async with self._engine.begin() as conn:
            holder = holder_name()
            result = await conn.execute(
                update(poller_leadership)
                .where(poller_leadership.c.id == _LEADERSHIP_ROW)
                .values(epoch=poller_leadership.c.epoch + 1, holder=holder)
            )
            if result.rowcount == 0:
                await conn.execute(
                    insert(poller_leadership).values(id=_LEADERSHIP_ROW, epoch=1, holder=holder)
                )
            epoch = (
                await conn.execute(
                    select(poller_leadership.c.epoch).where(
                        poller_leadership.c.id == _LEADERSHIP_ROW
                    )
                )
            ).scalar_one()
        return int(epoch)

    def _on_acquired(self) -> None:  # noqa: B027 (optional hook)
        """Called once leadership is held (start watching the lock)."""

    @abstractmethod
    async def _take_lock(self) -> bool:
        """Take the lock without waiting; False when another replica holds it."""

    @abstractmethod
    async def _drop_lock(self) -> None:
        """Let go of the lock, whether or not it is still held."""

    async def _fence_lock(self, conn: AsyncConnection) -> None:  # noqa: B027 (optional hook)
        """Check, inside the commit's transaction, that the lock itself is still held."""


class PostgresLeadership(PollerLeadership):
    """A session advisory lock on a connection of its own; see the module docstring."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        ping_interval_seconds: float,
        connect_timeout_seconds: float,
        lease_seconds: float,
    ) -> None:
        super().__init__(engine)
        connect_args: dict[str, Any] = postgres_connect_args(connect_timeout_seconds)
        self._lock_engine = create_async_engine(
            engine.url, poolclass=NullPool, hide_parameters=True, connect_args=connect_args
        )
        self._lease_seconds = lease_seconds
        self._ping_interval = min(ping_interval_seconds, lease_seconds / _RENEWALS_PER_LEASE)
        self._connection: AsyncConnection | None = None
        self._backend_pid: int | None = None
        self._watch: asyncio.Task[None] | None = None
        # What was left of the holder's lease at the last try that found it fresh.
        self._lease_left: float | None = None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend process of the lock connection (for pg_terminate_backend)."""
        return self._backend_pid

    def next_try_in(self, retry_seconds: float) -> float:
        """Just past the holder's lease when it runs out before the next retry would come."""
        left = self._lease_left
        if left is None:
            return retry_seconds
        return min(retry_seconds, max(0.0, left) + _AFTER_EXPIRY_SECONDS)

    async def _take_lock(self) -> bool:
        self._lease_left = None
        connection = await self._lock_engine.connect()
        try:
            # Autocommit: a session lock needs no transaction, and an idle open transaction
            # would hold back vacuum for as long as this replica leads.
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            taken = await _try_lock(connection)
            if not taken and await self._end_expired_leader(connection):
                taken = await _try_lock(connection)
            if not taken:
                await connection.close()
                return False
            pid = await connection.scalar(text("SELECT pg_backend_pid()"))
            await connection.execute(
                pg_insert(poller_lease)
                .values(id=_LEADERSHIP_ROW, holder=session_name(), renewed_at=func.now())
                .on_conflict_do_update(
                    index_elements=[poller_lease.c.id],
                    set_={"holder": session_name(), "renewed_at": func.now()},
                )
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            raise
        self._connection = connection
        self._backend_pid = int(pid)
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        if driver is not None:
            # asyncpg calls this when the server ends the session or the socket closes.
            driver.add_termination_listener(self._on_terminated)
        return True

    async def _end_expired_leader(self, connection: AsyncConnection) -> bool:
        """End every session of a leader whose lease ran out; True when any was ended."""
        row = (
            await connection.execute(
                text(
                    "SELECT l.holder, EXTRACT(EPOCH FROM now() - l.renewed_at) FROM "
                    "poller_lease l JOIN pg_locks k ON k.locktype = 'advisory' AND k.classid "
                    "= :class_key AND k.objid = :object_key AND k.objsubid = :form AND "
                    "k.granted JOIN pg_stat_activity a ON a.pid = k.pid AND "
                    "a.application_name = l.holder WHERE l.id = 1"
                ),
                {"class_key": LOCK_CLASS, "object_key": LOCK_OBJECT, "form": _TWO_KEY_FORM},
            )
        ).first()
        if row is None:
            return False  # no lease, or another session than the lease's holder has the lock
        holder, silent = str(row[0]), float(row[1])
        if silent <= self._lease_seconds:
            self._lease_left = self._lease_seconds - silent  # fresh: try again as it runs out
            return False
        ended = await connection.scalar(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, :wait)) FROM "
                "pg_stat_activity WHERE application_name = :holder AND pid <> pg_backend_pid()"
            ),
            {"holder": holder, "wait": _TERMINATE_WAIT_MS},
        )
        log.warning(
            "the poller's leader renewed no lease for longer than POLLER_LEADER_LEASE_SECONDS; "
            "its sessions were ended and this replica takes over",
            extra={"holder": holder, "silent_seconds": round(silent, 1), "sessions": ended},
        )
        return bool(ended)

    def _on_terminated(self, _connection: object) -> None:
        if self._connection is not None and not self.lost.is_set():
            log.warning("the poller's lock connection to PostgreSQL ended; leadership is lost")
            self.lost.set()

    def _on_acquired(self) -> None:
        self._watch = asyncio.create_task(self._ping_lock(), name="poller-leadership-ping")

    async def _ping_lock(self) -> None:
        """Renew the lease; notice a lock connection that died without a word (no FIN)."""
        lost = self.lost
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._ping_interval)
            connection = self._connection
            if lost.is_set() or connection is None:
                return
            try:
                async with asyncio.timeout(_PING_TIMEOUT_SECONDS):
                    renewed = await connection.execute(
                        update(poller_lease)
                        .where(
                            poller_lease.c.id == _LEADERSHIP_ROW,
                            poller_lease.c.holder == session_name(),
                        )
                        .values(renewed_at=func.now())
                    )
                if renewed.rowcount != 1:
                    log.warning("the poller's lease was taken over; leadership is lost")
                    lost.set()
                    return
            except (SQLAlchemyError, OSError, TimeoutError) as error:
                if not lost.is_set():
                    log.warning(
                        "the poller's lock connection to PostgreSQL failed; leadership is lost",
                        extra={"error": describe_error(error)},
                    )
                    lost.set()
                return

    async def _fence_lock(self, conn: AsyncConnection) -> None:
        held = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = "
                ":class_key AND objid = :object_key AND objsubid = :form AND pid = :pid "
                "AND granted"
            ),
            {
                "class_key": LOCK_CLASS,
                "object_key": LOCK_OBJECT,
                "form": _TWO_KEY_FORM,
                "pid": self._backend_pid,
            },
        )
        if not held:
            self.lost.set()
            raise LeadershipLost("the advisory lock's session has ended")

    async def _drop_lock(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        connection, self._connection = self._connection, None
        self._backend_pid = None
        if connection is not None:
            # Closing the session releases the advisory lock; a dead one is just discarded.
            try:
                await connection.close()
            except Exception:  # the session is gone either way
                log.debug("closing the poller's lock connection failed", exc_info=True)

    async def close(self) -> None:
        """Release leadership and close the lock engine."""
        await self.release()
        await self._lock_engine.dispose()


async def _try_lock(connection: AsyncConnection) -> bool:
    taken = await connection.scalar(
        text("SELECT pg_try_advisory_lock(:class_key, :object_key)"),
        {"class_key": LOCK_CLASS, "object_key": LOCK_OBJECT},
    )
    return bool(taken)


class FileLockLeadership(PollerLeadership):
    """`flock` on a lock file beside the SQLite database; see the module docstring."""

    def __init__(self, engine: AsyncEngine, lock_path: Path) -> None:
        super().__init__(engine)
        self.lock_path = lock_path
        self._fd: int | None = None

    async def _take_lock(self) -> bool:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        if not self._at_path(fd):
            # Replaced (deleted) between our open and our lock: a lock on a file no one
            # else will open proves nothing.
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_name()}\n".encode(), 0)
        self._fd = fd
        return True

    def _at_path(self, fd: int) -> bool:
        try:
            at_path = self.lock_path.stat()
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)

    async def _fence_lock(self, conn: AsyncConnection) -> None:  # noqa: ARG002 (the hook's signature)
        fd = self._fd
        if fd is None or not self._at_path(fd):
            # Someone deleted the lock file: another process can lock a new one.
            self.lost.set()
            raise LeadershipLost(f"the lock file {self.lock_path} was removed or replaced")

    async def _drop_lock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the flock


def lock_file_for(database: Path) -> Path:
    """The SQLite leader lock file: a dot file beside the database, not matched by `rm db*`.

    Beside the file itself, symlinks resolved: replicas that spell the database differently
    (a `file:` URI, a relative path, a symlink) take the same lock.
    """
    real = database.resolve()
    return real.with_name(f".{real.name}.poller-lock")


def leadership_for(engine: AsyncEngine, settings: Settings) -> PollerLeadership:
    """The leadership that fits the database behind `engine`."""
    if engine.dialect.name == "postgresql":
        return PostgresLeadership(
            engine,
            ping_interval_seconds=settings.poller_leader_retry_seconds,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
            lease_seconds=settings.poller_leader_lease_seconds,
        )
    # Every SQLite spelling the settings accept names a file (in-memory ones are refused).
    path = sqlite_file(settings.database_url)
    if path is None:  # pragma: no cover - only SQLite and PostgreSQL are accepted
        msg = f"no leadership for a {engine.dialect.name} database"
        raise ValueError(msg)
    return FileLockLeadership(engine, lock_file_for(path))
