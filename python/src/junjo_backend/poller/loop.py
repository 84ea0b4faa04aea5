"""The span poller: drains the ingestion-service's WAL into a sink, durably and in order.

Delivery is at least once, in key order, with no gap for an entry committed within the
settle window of its key's time (the horizon, below). For each batch the sink runs inside
a database transaction, and the batch's last key is written to `poller_state` (row id 1,
the Go backend's layout) in that same transaction, so a crash at any point either keeps
both the sink's writes and the new checkpoint or neither; after a restart the poller reads
again after the last committed key.

Unlike the Go backend (100 spans every 5 s), the poller reads one long stream and commits
every `POLLER_BATCH_SIZE` records while the stream keeps filling a bounded buffer behind
it, and it waits (`POLLER_IDLE_WAIT_SECONDS`) only once caught up.

The horizon. The ingestion-service takes a WAL key (a monotonic ULID) before it commits the
entry, and commits concurrent requests in any order, so a read can see key K+1 before K
exists; a reader that moved past K+1 then would never see K. So the poller holds a settle
window W (`POLLER_SETTLE_SECONDS`) and consumes an entry only once it has settled, by the
keys this process has seen and its own monotonic clock, never by comparing two hosts'
clocks (horizon.py). The guarantee: every entry committed within W of its key's time is
delivered, however far apart the clocks are. A read stops at its first unsettled entry, to
read it again once it has settled; now and then it reads on to the end instead, to see the
newest keys. The reasoning: docs/design/settle-window.md.

Caught up: nothing older than the settle window is unread; the proof lapses
max(W, idle wait) + 1 s after the read that gave it, and it is not known (None) on a
standby and while the ingestion-service is unreachable or answers with errors.
`entries_skipped` counts what later reads prove the server skipped (a lower bound). Both,
and the backlog age, are defined in docs/design/settle-window.md. Of several replicas only
the leader drains, and every commit is fenced: docs/design/leadership.md.

The span store. Only the leader opens it (DuckDB lets one process hold its file): when it
takes leadership, and it closes it when it steps down or stops. It resumes from the earlier
of the checkpoint and the store's watermark (the last WAL key the store holds), so a store
that lacks rows (deleted, restored from a backup) is refilled from the WAL and an older
checkpoint replays only what the store lacks; a new, empty store is refilled from the
WAL's start, and a store with no watermark (a file made by the Go backend, or a store that
commits with the checkpoint) resumes from the checkpoint, so the WAL is not replayed over
a Go file's rows. A store that cannot be opened (another process holds the file) keeps the
poller from leading, so nothing is consumed with nowhere to keep it; it tries again every
`POLLER_LEADER_RETRY_SECONDS`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from junjo_backend.backoff import backoff_delay
from junjo_backend.failures import error_line
from junjo_backend.ingestion.client import MAX_BATCH_SIZE
from junjo_backend.ingestion.spans import ulid_millis, ulid_time
from junjo_backend.poller.checkpoint import load_checkpoint, save_checkpoint
from junjo_backend.poller.horizon import SettleHorizon, monotonic_ms
from junjo_backend.poller.leadership import LeadershipLost, PollerLeadership, leadership_for
from junjo_backend.poller.sinks import (
    PollerStore,
    PreparingSink,
    ServiceTally,
    SpanSink,
    StoreSink,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.ingestion.client import IngestionClient
    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

# One ReadSpans call covers this many commit batches; the stream keeps reading while a batch
# commits, and a full read means more is waiting, so the next read starts at once.
_BATCHES_PER_READ = 100
_BACKOFF_INITIAL_SECONDS = 0.1
# After a read stopped at an unsettled entry, the next waits until that entry settles, but at
# least this share of the window: re-reading the head every few milliseconds would mostly
# re-send entries that cannot be consumed yet.
_SETTLE_PAUSE_SHARE = 0.25
_SETTLE_MARGIN_SECONDS = 0.01
# While no read of its own shows whether the ingestion-service is reachable (a standby, a
# leader backing off), the poller probes it this often: `reachable` is never older than
# REACHABLE_MAX_AGE_SECONDS (5 s).
_PROBE_EVERY_SECONDS = 2.0
# Caught up stays true this long after the read that proved it, beyond the longest pause
# between two reads of a poller that keeps up (the settle window's or the idle wait):
# the time one such read takes.
_CAUGHT_UP_READ_SECONDS = 1.0
# A read that stops at the first unsettled entry sees keys about W old, never the newest:
# this often one reads on to the end of its stream instead, so the horizon learns from the
# newest keys (docs/design/settle-window.md). It re-sends about W of entries each time.
_LOOK_AHEAD_EVERY_SECONDS = 30.0
# A look-ahead keeps at most this many unsettled records; past them it only looks at keys.
_LOOK_AHEAD_HELD_RECORDS = 65_536


class PollerStatus(BaseModel):
    """The poller's state: what `/health` shows under `poller` and `/metrics` reads."""

    # bytes (the checkpoint key) go into JSON as hex.
    model_config = ConfigDict(frozen=True, ser_json_bytes="hex")

    enabled: bool = Field(description="POLLER_ENABLED")
    running: bool
    caught_up: bool | None = Field(
        description="nothing older than the settle window is unread (module doc); null while "
        "not known: a standby, or the ingestion-service unreachable or failing"
    )
    backlog_age_seconds: float | None = Field(
        description="0 when caught up; while behind, the age of the oldest unprocessed span "
        "(or, with none read yet, of the oldest an unread one can have); null while not known"
    )
    last_key: bytes | None = Field(description="the checkpoint: the last processed WAL key")
    last_key_received_at: datetime | None = Field(
        description="when the ingestion-service received the span of last_key (its key's time)"
    )
    spans_processed: int
    batches_committed: int
    entries_skipped: int = Field(
        description="WAL entries the ingestion-service skipped (undecodable), a lower bound"
    )
    last_error: str | None = Field(
        description="the latest failure: of the ingestion-service's last call, else the poller's"
    )
    role: Literal["leader", "standby"] | None = Field(
        default=None,
        description="replicas: only the leader drains; a standby is healthy (null: disabled)",
    )
    role_since: datetime | None = Field(
        default=None, description="when this replica became the leader (UTC); null: a standby"
    )

    @classmethod
    def disabled(cls) -> PollerStatus:
        """The status when POLLER_ENABLED=false."""
        return cls(
            enabled=False,
            running=False,
            caught_up=False,
            backlog_age_seconds=None,
            last_key=None,
            last_key_received_at=None,
            spans_processed=0,
            batches_committed=0,
            entries_skipped=0,
            last_error=None,
        )


@dataclass(slots=True)
class _Read:
    """One ReadSpans call of the poller, and what it showed."""

    asked: int  # batch_size
    requested_at: float  # time.monotonic() just before the call
    windowed: bool  # a settle window applies (POLLER_SETTLE_SECONDS > 0)
    cutoff_ms: int | None  # settled at the start: keys stamped at or before this (None: none)
    look_ahead: bool = False  # read on past unsettled entries, to see the newest keys
    dropped_ms: int | None = None  # look-ahead: key time of the first unsettled entry not kept
    delivered: int = 0  # records the server sent
    first_key_ms: int | None = None  # key time of the first record sent
    unsettled_ms: int | None = None  # key time of the record the read stopped at
    ended: bool = False  # the stream ended OK (not stopped early, not failed)
    mature: bool = False  # the horizon's first sighting was W old when the read started

    @property
    def caught_up(self) -> bool:
        """The definition of caught up (module docstring)."""
        # A stop proves it only once something had settled by the horizon: before any key
        # was seen, a stop says only that the rest is within W of the newest key read.
        # And only once the horizon itself has settled: entries held in the first W after
        # the first sighting may be a backlog's, older than the window by the service's clock.
        stopped = self.unsettled_ms is not None and self.cutoff_ms is not None and self.mature
        return stopped or (self.ended and self.asked == MAX_BATCH_SIZE)

    @property
    def short(self) -> bool:
        """A bounded window that ended with fewer records than asked for: end or skips."""
        return self.ended and self.asked < MAX_BATCH_SIZE and self.delivered < self.asked


class _Stopping(Exception):  # noqa: N818 (control flow inside the poller, never escapes)
    """Raised inside the run loop once stop() has been asked for."""


class SpanPoller:
    """Drains the WAL from the checkpoint into a sink; see the module docstring.

    The caller owns the client (connects and closes it); the poller owns its task.
    """

    def __init__(
        self,
        client: IngestionClient,
        engine: AsyncEngine,
        sink: SpanSink | None = None,
        *,
        settings: Settings,
        leadership: PollerLeadership | None = None,
        store: PollerStore | None = None,
    ) -> None:
        self._client = client
        self._engine = engine
        self._store = store
        self._store_open = False
        self._store_error: str | None = None
        if sink is None:
            sink = ServiceTally()
            if store is not None:
                sink = StoreSink(
                    store, sigkill_after_commits=settings.test_only_sigkill_after_store_commits
                )
        self._sink: SpanSink = sink
        self._prepare = sink.prepare if isinstance(sink, PreparingSink) else None
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._in_transaction = False
        self._checkpoint: bytes | None = None
        self._spans_processed = 0
        self._batches_committed = 0
        self._entries_skipped = 0
        # Key time (ms) of the oldest entry read but not yet processed: the backlog's age.
        self._oldest_unprocessed_ms: int | None = None
        self._last_error: str | None = None
        self._caught_up = False
        # When the read that proved the poller caught up was requested (monotonic).
        self._caught_up_at: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._read_size = min(settings.poller_batch_size * _BATCHES_PER_READ, MAX_BATCH_SIZE)
        self._settle_ms = round(settings.poller_settle_seconds * 1000)
        self._horizon = SettleHorizon(self._settle_ms)
        self._head_seen_at = -math.inf  # monotonic: when a read last reached its stream's end
        self._leadership = leadership or leadership_for(engine, settings)
        self._role: Literal["leader", "standby"] = "standby"
        self._role_since: float | None = None

    @property
    def leadership(self) -> PollerLeadership:
        """What decides whether this replica drains."""
        return self._leadership

    @property
    def sink(self) -> SpanSink:
        """The sink batches go to."""
        return self._sink

    @property
    def store(self) -> PollerStore | None:
        """The span store (None: count only)."""
        return self._store

    @property
    def store_open(self) -> bool:
        """Whether this replica holds the span store open (only while it leads)."""
        return self._store_open

    @property
    def store_error(self) -> str | None:
        """Why the span store could not be opened at the last try; None once it opened."""
        return self._store_error

    @property
    def status(self) -> PollerStatus:
        """A snapshot of the poller's state; computing it changes nothing and calls nothing."""
        checkpoint = self._checkpoint
        leads = self._role == "leader"
        caught_up, backlog = self._progress() if leads else (None, None)
        return PollerStatus(
            enabled=True,
            running=self._task is not None and not self._task.done(),
            caught_up=caught_up,
            backlog_age_seconds=backlog,
            last_key=checkpoint,
            last_key_received_at=None if checkpoint is None else ulid_time(checkpoint),
            spans_processed=self._spans_processed,
            batches_committed=self._batches_committed,
            entries_skipped=self._entries_skipped,
            last_error=self._client.last_error or self._last_error,
            role=self._role,
            role_since=datetime.fromtimestamp(self._role_since, UTC)
            if leads and self._role_since is not None
            else None,
        )

    def _key_clock_ms(self) -> float:
        """The ingestion-service's clock now: this host's, or later where the keys seen prove it.

        Ages come out too high when this clock runs ahead, never too low: an alert errs loud.
        """
        estimate = self._horizon.key_clock(monotonic_ms())
        wall = time.time() * 1000
        return wall if estimate is None else max(wall, estimate)

    def _progress(self) -> tuple[bool | None, float | None]:
        """The leader's caught-up answer and backlog age (module docstring)."""
        now = time.monotonic()
        proved = self._caught_up_at
        window = self._settle_ms / 1000
        # The longest a poller that keeps up goes between two reads, and one read's time.
        fresh = max(window, self._settings.poller_idle_wait_seconds) + _CAUGHT_UP_READ_SECONDS
        caught_up: bool | None = self._caught_up and proved is not None and now - proved <= fresh
        if self._client.reachable is not True or self._last_error or self._client.last_error:
            caught_up = None  # an outage or failing reads: not known
        oldest = self._oldest_unprocessed_ms
        if caught_up:
            return caught_up, 0.0
        if oldest is not None:
            return caught_up, max(0.0, self._key_clock_ms() - oldest) / 1000
        if proved is not None:
            # Nothing unprocessed read: an unread span is at most this old.
            return caught_up, now - proved + window
        return caught_up, None

    async def start(self) -> None:
        """Load the checkpoint and start draining in a background task; idempotent."""
        if self._task is not None and not self._task.done():
            return
        async with self._engine.connect() as conn:
            self._checkpoint = await load_checkpoint(conn)
        await self._client.connect()
        self._stop_requested = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="span-poller")
        self._probe = asyncio.create_task(self._keep_reachability_fresh(), name="poller-probe")
        log.info(
            "span poller started",
            extra={"checkpoint": self._checkpoint.hex() if self._checkpoint else None},
        )

    async def stop(self) -> None:
        """Stop at once (a batch being committed finishes first); idempotent."""
        task = self._task
        if task is None:
            return
        self._stop_requested.set()
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.wait({probe})
        if not self._in_transaction:
            # Waiting on the network or a timer: nothing is lost by cancelling there.
            task.cancel()
        _done, pending = await asyncio.wait(
            {task}, timeout=self._settings.grpc_shutdown_grace_seconds
        )
        if pending:
            log.warning("span poller did not finish its batch in time; cancelling it")
            task.cancel()
            await asyncio.wait({task})
        self._task = None
        try:
            # The store first: a successor that takes leadership can open the file at once.
            await self._close_store()
            await self._leadership.close()
        finally:
            self._set_role("standby")
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("span poller task failed", exc_info=error)
        log.info("span poller stopped", extra={"spans_processed": self._spans_processed})

    async def _run(self) -> None:
        """Lead or stand by; drain, wait when caught up or at the settle window, back off."""
        failures = 0
        short: _Read | None = None  # the last bounded window that came back short
        while not self._stop_requested.is_set():
            if not self._leadership.held:
                short = None
                if not await self._lead_or_wait():
                    continue
            read = self._next_read(MAX_BATCH_SIZE if short is not None else self._read_size)
            try:
                await self._drain(read)
            except _Stopping:
                return
            except LeadershipLost as lost:
                log.warning(
                    "span poller lost leadership; it stops draining and stands by",
                    extra={"reason": str(lost)},
                )
                await self._step_down()
                continue
            except Exception as error:  # noqa: BLE001 (any failure: back off, retry from the checkpoint)
                failures += 1
                await self._wait_after_failure(error, failures)
                continue
            failures = 0
            short = await self._after_read(read, short)

    async def _keep_reachability_fresh(self) -> None:
        """Probe the ingestion-service (a ReadSpans of size 0) when no read has shown it lately.

        A standby reads nothing and a leader backing off reads seldom: without this their
        `reachable` would go stale (it then reads as not known) rather than follow the service.
        """
        timeout = min(self._settings.health_probe_timeout_seconds, _PROBE_EVERY_SECONDS)
        while True:
            age = self._client.evidence_age()
            if age is None or age >= _PROBE_EVERY_SECONDS:
                await self._probe_once(timeout)
                age = 0.0
            await asyncio.sleep(_PROBE_EVERY_SECONDS - age)

    async def _probe_once(self, timeout: float) -> None:  # noqa: ASYNC109 (the probe's deadline)
        """A leader checks the connection; a standby also reads the entry after the checkpoint.

        The standby's sighting (that key, committed by now) goes to the horizon, so that on
        taking over it knows which of the backlog has settled and does not hold it a window
        more (docs/design/settle-window.md).
        """
        if self._role == "leader":
            await self._client.check_connection(timeout)
            return
        answered, key = await self._client.probe(timeout, after=self._checkpoint, records=1)
        if answered and key:
            self._horizon.see(ulid_millis(key), monotonic_ms(), matures=False)

    async def _wait_after_failure(self, error: Exception, failures: int) -> None:
        """Report a failed drain and wait before retrying from the checkpoint."""
        self._caught_up = False
        # One line naming the cause: never a statement's text or parameters.
        self._last_error = error_line(error)
        delay = self._retry_delay(failures)
        log.warning(
            "span poller batch failed; retrying from the checkpoint",
            extra={"error": self._last_error, "retry_in_seconds": round(delay, 3)},
        )
        await self._pause(delay)

    async def _after_read(self, read: _Read, short: _Read | None) -> _Read | None:
        """Note what a read proved, wait as it says; the short window to follow up, if any."""
        self._last_error = None
        if short is not None:
            self._count_skipped(short, read)
        # A short window that brought nothing proves nothing either way and the read of
        # the largest size follows at once: the status keeps the last conclusive answer
        # rather than saying "behind" for that moment after every idle pause.
        if read.delivered or not read.short:
            self._caught_up = read.caught_up
        if read.caught_up:
            self._caught_up_at = read.requested_at
            self._oldest_unprocessed_ms = None
        if read.unsettled_ms is not None:
            await self._pause(self._until_settled(read.unsettled_ms))
        elif read.caught_up:
            await self._pause(self._settings.poller_idle_wait_seconds)
        return read if read.short else None

    async def _lead_or_wait(self) -> bool:
        """Become leader if possible; otherwise stand by until the next try."""
        if self._role == "leader":
            await self._step_down()
            return False
        if await self._try_to_lead():
            return True
        await self._pause(self._leadership.next_try_in(self._settings.poller_leader_retry_seconds))
        return False

    async def _try_to_lead(self) -> bool:
        """One try for leadership; as leader, open the store and pick where to resume."""
        try:
            leads = await self._leadership.acquire()
            async with self._engine.connect() as conn:
                # As a standby, its view of the leader's progress, for /health.
                self._checkpoint = await load_checkpoint(conn)
            self._last_error = None
            if leads and not await self._open_store():
                # Nowhere to keep spans: let another replica lead, try again later.
                await self._leadership.release()
                return False
            if leads:
                self._checkpoint = await self._resume_point(self._checkpoint)
                self._set_role("leader")
                return True
        except Exception as error:  # noqa: BLE001 (a failed try is retried like a busy lock)
            self._last_error = error_line(error)
            log.warning(
                "span poller could not try for leadership; retrying",
                extra={"error": self._last_error},
            )
            with contextlib.suppress(Exception):
                await self._close_store()
            await self._release_after_failed_try()
        return False

    async def _release_after_failed_try(self) -> None:
        """Drop whatever a failed try took; a failure here is logged and not raised.

        That is safe: `release` marks this replica "not leader" before it drops the lock,
        and the next try releases again before it takes the lock (leadership.py).
        """
        try:
            await self._leadership.release()
        except Exception:
            log.debug(
                "span poller could not release after a failed try; the next try releases again",
                exc_info=True,
            )

    async def _step_down(self) -> None:
        """Let go of a lost (or doubtful) leadership, become a standby, and yield a while.

        A healthy standby tries within one retry interval; waiting two lets it take over,
        rather than this replica whose lock connection (or database link) just failed.
        """
        self._caught_up = False
        try:
            await self._close_store()
            await self._leadership.release()
        finally:
            self._set_role("standby")
        await self._pause(self._settings.poller_leader_retry_seconds * 2)

    async def _open_store(self) -> bool:
        """Open the span store (if any, and not open yet); False, with the reason noted, if not."""
        if self._store is None or self._store_open:
            return True
        try:
            await self._store.open()
        except Exception as error:  # noqa: BLE001 (any failure: no drain, retried)
            # StoreUnavailable's message is the line (file and holder); else the error's.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else None
            reason = reason or error_line(error)
            # Once per outage at WARNING (at start-up: the line naming file and holder).
            level = logging.DEBUG if reason == self._store_error else logging.WARNING
            log.log(
                level,
                "span store unavailable; the poller does not drain until it opens",
                extra={
                    "reason": reason,
                    "retry_in_seconds": self._settings.poller_leader_retry_seconds,
                },
            )
            self._store_error = reason
            return False
        if self._store_error is not None:
            log.info("span store open; the poller drains again")
        self._store_open, self._store_error = True, None
        return True

    async def _close_store(self) -> None:
        if self._store is not None and self._store_open:
            self._store_open = False
            await self._store.close()

    async def _resume_point(self, checkpoint: bytes | None) -> bytes | None:
        """The earlier of the checkpoint and the store's watermark (module docstring).

        None is the WAL's start, and so is a watermark of b"" (a store that holds nothing of
        the WAL yet). No watermark (None: a Go-made file, or a store that commits with the
        checkpoint): the checkpoint.
        """
        if self._store is None or checkpoint is None:
            return checkpoint
        watermark = await self._store.watermark()
        if watermark is None:
            return checkpoint
        if watermark < checkpoint:
            log.info(
                "the span store holds less than the checkpoint; replaying what it lacks",
                extra={"watermark": watermark.hex() or None, "checkpoint": checkpoint.hex()},
            )
            return watermark or None  # b"": a store that holds nothing of the WAL yet
        return checkpoint

    def _set_role(self, role: Literal["leader", "standby"]) -> None:
        if role == self._role:
            return
        self._role, self._role_since = role, time.time()
        log.info(
            "span poller is the leader now; it drains the WAL"
            if role == "leader"
            else "span poller is a standby now; another replica may drain",
            extra={"role": role},
        )

    def _next_read(self, asked: int) -> _Read:
        """A read of `asked` records, its settle cutoff taken now (before the call starts)."""
        now = time.monotonic()
        windowed = self._settle_ms > 0
        # The server's read snapshot is taken after this moment, so every key the horizon
        # calls settled now is in it (horizon.py).
        cutoff = self._horizon.cutoff(now * 1000) if windowed else None
        look_ahead = windowed and (
            cutoff is None or now - self._head_seen_at > _LOOK_AHEAD_EVERY_SECONDS
        )
        return _Read(
            asked=asked,
            requested_at=now,
            windowed=windowed,
            cutoff_ms=cutoff,
            look_ahead=look_ahead,
            mature=self._horizon.settled_once(now * 1000),
        )

    def _until_settled(self, key_ms: int) -> float:
        """Seconds until an entry stamped `key_ms` is out of the settle window."""
        cutoff = self._horizon.cutoff(monotonic_ms())
        window = self._settle_ms / 1000
        remaining = window if cutoff is None else (key_ms - cutoff) / 1000
        # Past the boundary, not onto it: the cutoff is floored to the millisecond and an
        # old sighting widens by the clock-rate tolerance, so a wake at the exact moment
        # finds the entry a millisecond short and spends a read holding it again.
        return min(window, max(remaining, window * _SETTLE_PAUSE_SHARE)) + _SETTLE_MARGIN_SECONDS

    def _count_skipped(self, short: _Read, after: _Read) -> None:
        """Count what a short window skipped, if the read after it proves it was not the end."""
        found = after.first_key_ms
        if found is None or short.cutoff_ms is None or found > short.cutoff_ms:
            # Nothing found, or only entries that may have been committed since the short
            # read's snapshot: the short window may simply have reached the end.
            return
        skipped = short.asked - short.delivered
        self._entries_skipped += skipped
        log.warning(
            "the ingestion-service skipped WAL entries that do not decode",
            extra={
                "skipped": skipped,
                "after_key": self._checkpoint.hex() if self._checkpoint else None,
            },
        )

    async def _drain(self, read: _Read) -> None:
        """Read one stream from the checkpoint, committing batch by batch, filling in `read`."""
        batch_size = self._settings.poller_batch_size
        # A sink that converts ahead gets a batch once the next one is read too: the next
        # converts while this one is stored.
        full = batch_size * (1 if self._prepare is None else 2)
        pending: list[SpanRecord] = []
        held: list[SpanRecord] = []  # read but not settled yet
        chunks = self._client.stream_chunks(self._checkpoint, read.asked)
        lost = self._leadership.lost
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if lost.is_set():
                    raise LeadershipLost("the lock was lost while reading")
                stop = self._take(read, chunk, pending, held)
                if pending or held:
                    self._oldest_unprocessed_ms = ulid_millis((pending or held)[0].key)
                while len(pending) >= full:
                    await self._commit(pending, batch_size)
                    del pending[:batch_size]
                if stop:
                    break
            else:
                read.ended = True
                if read.delivered < read.asked:
                    self._head_seen_at = time.monotonic()  # the newest key has been seen
        if held:
            read.unsettled_ms = ulid_millis(held[0].key)
        while pending:
            await self._commit(pending, batch_size)
            del pending[:batch_size]

    def _take(
        self,
        read: _Read,
        chunk: list[SpanRecord],
        pending: list[SpanRecord],
        held: list[SpanRecord],
    ) -> bool:
        """Move a chunk's settled records to `pending`, hold the rest; True: stop reading."""
        newest_ms = ulid_millis(chunk[-1].key)
        self._horizon.see(newest_ms, monotonic_ms())
        if read.first_key_ms is None:
            read.first_key_ms = ulid_millis(chunk[0].key)
        read.delivered += len(chunk)
        if not read.windowed:
            pending.extend(chunk)
            return False
        if read.dropped_ms is None:
            held.extend(chunk)
            if len(held) > _LOOK_AHEAD_HELD_RECORDS:
                read.dropped_ms = ulid_millis(held[_LOOK_AHEAD_HELD_RECORDS].key)
                del held[_LOOK_AHEAD_HELD_RECORDS:]
        # A key in this read's snapshot settles every key stamped W before it (horizon.py).
        cutoff = newest_ms - self._settle_ms
        if read.cutoff_ms is not None:
            cutoff = max(cutoff, read.cutoff_ms)
        settled = _settled_prefix(held, cutoff)
        pending.extend(held[:settled])
        del held[:settled]
        if read.dropped_ms is not None:
            # Read on until what was not kept has settled; the next read starts there.
            return read.dropped_ms <= cutoff
        return bool(held) and not read.look_ahead

    async def _commit(self, pending: list[SpanRecord], batch_size: int) -> None:
        """Hand the first `batch_size` records to the sink and move the checkpoint past them.

        One transaction. A sink that converts ahead is told of the batch after them first.
        """
        batch = pending[:batch_size]
        if self._prepare is not None and len(pending) > batch_size:
            self._prepare(pending[batch_size : 2 * batch_size])
        last_key = batch[-1].key
        self._in_transaction = True
        try:
            if not self._leadership.held:
                raise LeadershipLost("this replica is not the leader")
            async with self._engine.begin() as conn:
                await self._sink.handle(batch, conn)
                await save_checkpoint(conn, last_key)
                # Last, just before the commit: a lock lost while the sink worked fails the
                # batch, and the epoch row it locks keeps a successor from reading the
                # checkpoint until this transaction has ended (leadership.py).
                await self._leadership.fence(conn)
        finally:
            self._in_transaction = False
        self._checkpoint = last_key
        self._spans_processed += len(batch)
        self._batches_committed += 1
        # The next entry is no older than this one: a bound until the drain reads it.
        self._oldest_unprocessed_ms = ulid_millis(last_key)
        if self._stop_requested.is_set():
            raise _Stopping

    def _retry_delay(self, failures: int) -> float:
        """Delay before retry number `failures`."""
        return backoff_delay(
            failures,
            initial=_BACKOFF_INITIAL_SECONDS,
            ceiling=self._settings.poller_max_backoff_seconds,
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return as soon as stop() is asked for or held leadership is lost."""
        waits = [asyncio.ensure_future(self._stop_requested.wait())]
        if self._leadership.held:
            waits.append(asyncio.ensure_future(self._leadership.lost.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


Held = list["SpanRecord"]  # records read but not settled yet


def _settled_prefix(chunk: Sequence[SpanRecord], cutoff_ms: int) -> int:
    """How many records at the front of `chunk` are stamped at or before `cutoff_ms`."""
    return bisect.bisect_right(chunk, cutoff_ms, key=lambda record: ulid_millis(record.key))
