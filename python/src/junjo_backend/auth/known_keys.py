"""The set of API keys in the `api_keys` table, as recently read: what the auth server answers from.

A snapshot of the whole set, not a query per call (docs/design/known-keys.md has why):

- an answer comes from a snapshot at most `max_age` old, or the call fails
  (`KeyStoreUnavailable`): a revoked key stops validating within `max_age`;
- a failed read discards the snapshot: every call fails until a read succeeds;
- a key missing from a snapshot older than `miss_refresh_after` triggers a refresh;
- reads are single-flight, and a failed read answers every call it is fresh enough for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from junjo_backend.database import SerialQueries, api_keys
from junjo_backend.failures import describe_error

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# The ingestion-service gives each ValidateApiKey call 5 s; a read that hangs longer than
# this is treated as a failed one, so callers get a status well before their deadline (even
# while SQLite waits for a lock another process holds: the query is left to end on its own).
DEFAULT_READ_TIMEOUT_SECONDS = 2.0
DEFAULT_MISS_REFRESH_AFTER_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """The outcome of one read of the table: every key in it, or None when the read failed.

    `read_at` (monotonic) is when the read started: anything committed before it is in it.
    """

    keys: frozenset[str] | None
    read_at: float


class KeyStoreUnavailable(Exception):  # noqa: N818 (the name reads as the condition it reports)
    """No snapshot fresh enough could be read; the message names no key."""


class KnownKeys:
    """Answers "is this key in the database?" from a snapshot no older than `max_age`."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_age: float,
        miss_refresh_after: float = DEFAULT_MISS_REFRESH_AFTER_SECONDS,
        read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS,
    ) -> None:
        if not 0 < miss_refresh_after <= max_age:
            raise ValueError("need 0 < miss_refresh_after <= max_age")
        self._engine = engine
        self._max_age = max_age
        self._miss_refresh_after = miss_refresh_after
        self._read_timeout = read_timeout
        self._query = select(api_keys.c.key)
        self._latest: KeySnapshot | None = None
        self._reading: asyncio.Task[KeySnapshot] | None = None
        self._reading_since = -math.inf
        # Every read under way: a late caller may start one while an older one still runs.
        self._under_way: set[asyncio.Task[KeySnapshot]] = set()
        self._queries = SerialQueries()
        self._available: bool | None = None
        self._reads = 0
        self._failures = 0

    @property
    def max_age(self) -> float:
        """How old a snapshot may be and still answer."""
        return self._max_age

    @property
    def available(self) -> bool | None:
        """Whether the latest read succeeded; None before the first read."""
        return self._available

    @property
    def reads(self) -> int:
        """Reads of the table so far (each one query)."""
        return self._reads

    @property
    def failures(self) -> int:
        """Reads that failed so far."""
        return self._failures

    @property
    def size(self) -> int:
        """How many keys the current snapshot holds (0 before the first read or after a failure)."""
        latest = self._latest
        return 0 if latest is None or latest.keys is None else len(latest.keys)

    def age(self) -> float:
        """Seconds since the current snapshot's read started (infinite when there is none)."""
        latest = self._latest
        if latest is None or latest.keys is None:
            return math.inf
        return time.monotonic() - latest.read_at

    async def contains(self, key: str) -> bool:
        """Whether `key` is in the table; raises `KeyStoreUnavailable` rather than guess."""
        now = time.monotonic()
        keys = await self._keys_since(now - self._max_age)
        if key in keys:
            return True
        if self._latest is not None and self._latest.read_at >= now - self._miss_refresh_after:
            return False
        return key in await self._keys_since(now - self._miss_refresh_after)

    async def refresh(self) -> bool:
        """Read the table once (or join a read that started just now); whether it succeeded."""
        return (await self._outcome_since(time.monotonic())).keys is not None

    async def close(self) -> None:
        """Cancel every read under way; later calls still work (they start new reads)."""
        for reading in list(self._under_way):
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        self._reading = None
        await self._queries.close()

    async def _keys_since(self, not_before: float) -> frozenset[str]:
        """The keys of a read that started at `not_before` or later; raises if it failed."""
        keys = (await self._outcome_since(not_before)).keys
        if keys is None:
            raise KeyStoreUnavailable("the API key store cannot be read")
        return keys

    async def _outcome_since(self, not_before: float) -> KeySnapshot:
        """The latest read's outcome if it started at `not_before` or later, else a new one's."""
        latest = self._latest
        if latest is not None and latest.read_at >= not_before:
            return latest
        reading = self._reading
        if reading is None or reading.done() or self._reading_since < not_before:
            self._reading_since = time.monotonic()
            reading = asyncio.create_task(self._read(self._reading_since), name="api-keys-read")
            self._reading = reading
            self._under_way.add(reading)
            reading.add_done_callback(self._under_way.discard)
        # Shielded: a caller that gives up (deadline, cancel) must not cancel the read
        # that other callers are waiting on.
        return await asyncio.shield(reading)

    async def _query_keys(self) -> frozenset[str]:
        async with self._engine.connect() as conn:
            try:
                result = await conn.execute(self._query)
            except Exception:
                # A connection that failed once (its file replaced, its server restarted)
                # is dropped rather than handed to the next read.
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise
            return frozenset(result.scalars())

    async def _read(self, started: float) -> KeySnapshot:
        self._reads += 1
        try:
            # Given up at the read timeout even while SQLite waits for a lock (SerialQueries).
            keys = await self._queries.run(self._query_keys, self._read_timeout)
            outcome = KeySnapshot(keys, started)
        except Exception as exc:  # noqa: BLE001 (any failure means: no fresh snapshot)
            outcome = KeySnapshot(None, started)
            self._failures += 1
            if self._available is not False:
                log.error(  # noqa: TRY400 (the cause is in `error`; a traceback adds nothing)
                    "cannot read API keys from the database; answering INTERNAL until a "
                    "read succeeds",
                    extra={"error": describe_error(exc), "max_age_s": self._max_age},
                )
            else:
                log.debug("API key read failed again", extra={"error": describe_error(exc)})
            self._available = False
        else:
            if self._available is False:
                log.warning("API keys readable again", extra={"keys": len(outcome.keys or ())})
            self._available = True
        # Two reads can overlap (a late caller starts its own); the later start wins.
        if self._latest is None or started >= self._latest.read_at:
            self._latest = outcome
        if self._reading is asyncio.current_task():
            self._reading = None
        return outcome
