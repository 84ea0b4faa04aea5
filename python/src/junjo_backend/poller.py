"""The span poller: drains the ingestion-service's WAL into a sink, durably and in order.

Delivery is at least once, in key order, with no gap. For each batch the sink runs inside a
database transaction, and the batch's last key is written to `poller_state` (row id 1, the
Go backend's layout) in that same transaction, so a crash at any point either keeps both
the sink's writes and the new checkpoint or neither; after a restart the poller reads again
after the last committed key.

Unlike the Go backend (100 spans every 5 s, at most 20 spans/s), the poller reads one long
stream and commits every `POLLER_BATCH_SIZE` records while the stream keeps filling a
bounded buffer behind it, and it waits (`POLLER_IDLE_WAIT_SECONDS`) only once the WAL is
exhausted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import insert, select, update

from junjo_backend.database import poller_state
from junjo_backend.spans import ResourceCatalog, partition_decodable, ulid_millis

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.ingestion_client import IngestionClient
    from junjo_backend.settings import Settings
    from junjo_backend.spans import SpanRecord

log = logging.getLogger(__name__)

_CHECKPOINT_ROW = 1
# One ReadSpans call covers this many commit batches; the stream keeps reading while a batch
# commits, and a full read means more is waiting, so the next read starts at once.
_BATCHES_PER_READ = 100
_BACKOFF_INITIAL_SECONDS = 0.1


class SpanSink(Protocol):
    """Where the poller delivers spans. `handle` runs inside the checkpoint's transaction."""

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        """Process `batch` (decodable records, key order); write to the database through `conn`.

        Raising rolls back the transaction, leaves the checkpoint where it was, and the
        poller delivers the same records again after a backoff.
        """
        ...


async def load_checkpoint(conn: AsyncConnection) -> bytes | None:
    """The key of the last WAL entry the poller has processed, or None before the first batch."""
    result = await conn.execute(
        select(poller_state.c.last_key).where(poller_state.c.id == _CHECKPOINT_ROW)
    )
    key = result.scalar_one_or_none()
    return bytes(key) if key else None


async def save_checkpoint(conn: AsyncConnection, last_key: bytes) -> None:
    """Record `last_key` as processed, within the caller's transaction."""
    result = await conn.execute(
        update(poller_state).where(poller_state.c.id == _CHECKPOINT_ROW).values(last_key=last_key)
    )
    if result.rowcount == 0:
        await conn.execute(insert(poller_state).values(id=_CHECKPOINT_ROW, last_key=last_key))


@dataclass(frozen=True, slots=True)
class ServiceActivity:
    """What the default sink has seen of one service."""

    service: str
    spans: int
    last_key: bytes
    lag_seconds: float  # receive-to-processing delay of the service's latest span


class ServiceTally:
    """The default sink: counts spans per `service.name` and measures ingestion lag.

    It keeps totals in memory, logs a summary every `summary_interval_seconds` of activity,
    and writes nothing to the database (the poller writes the checkpoint).
    """

    def __init__(
        self,
        *,
        catalog: ResourceCatalog | None = None,
        summary_interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog or ResourceCatalog()
        self._summary_interval = summary_interval_seconds
        self._clock = clock
        self._activity: dict[str, ServiceActivity] = {}
        self._spans_since_summary = 0
        self._last_summary = clock()

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:  # noqa: ARG002 (the sink writes nothing)
        """Count the batch's spans per service and note each service's lag."""
        # Grouping by resource bytes first (C-level Counter) means one catalog look-up per
        # distinct resource in the batch rather than one per span.
        per_resource = Counter(record.resource_bytes for record in batch)
        last_key_per_resource = {record.resource_bytes: record.key for record in batch}
        now = self._clock()
        service_name = self._catalog.service_name
        for resource_bytes, count in per_resource.items():
            service = service_name(resource_bytes)
            last_key = last_key_per_resource[resource_bytes]
            spans = count
            before = self._activity.get(service)
            if before is not None:
                spans += before.spans
                last_key = max(last_key, before.last_key)
            self._activity[service] = ServiceActivity(
                service=service,
                spans=spans,
                last_key=last_key,
                lag_seconds=max(0.0, now - ulid_millis(last_key) / 1000),
            )
        self._spans_since_summary += len(batch)
        if now - self._last_summary >= self._summary_interval:
            self.log_summary()

    def activity(self) -> dict[str, ServiceActivity]:
        """Totals per service since the process started."""
        return dict(self._activity)

    @property
    def spans_total(self) -> int:
        """Spans counted since the process started."""
        return sum(activity.spans for activity in self._activity.values())

    def log_summary(self) -> None:
        """Log the totals per service."""
        self._last_summary = self._clock()
        log.info(
            "span totals",
            extra={
                "spans_since_last_summary": self._spans_since_summary,
                "services": {
                    name: {"spans": activity.spans, "lag_seconds": round(activity.lag_seconds, 3)}
                    for name, activity in sorted(self._activity.items())
                },
            },
        )
        self._spans_since_summary = 0


@dataclass(frozen=True, slots=True)
class PollerStatus:
    """The poller's state, for health checks."""

    running: bool
    connected: bool
    last_key: bytes | None
    lag_seconds: float | None  # now minus the ULID time of last_key
    spans_processed: int
    decode_failures: int
    last_error: str | None
    caught_up: bool = False  # the last read reached the end of the WAL


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
    ) -> None:
        self._client = client
        self._engine = engine
        self._catalog = ResourceCatalog()
        self._sink: SpanSink = sink if sink is not None else ServiceTally(catalog=self._catalog)
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._in_transaction = False
        self._checkpoint: bytes | None = None
        self._spans_processed = 0
        self._decode_failures = 0
        self._last_error: str | None = None
        self._caught_up = False

    @property
    def sink(self) -> SpanSink:
        """The sink batches go to."""
        return self._sink

    @property
    def status(self) -> PollerStatus:
        """A snapshot of the poller's state."""
        checkpoint = self._checkpoint
        lag = None if checkpoint is None else max(0.0, time.time() - ulid_millis(checkpoint) / 1000)
        return PollerStatus(
            running=self._task is not None and not self._task.done(),
            connected=self._client.connected,
            last_key=checkpoint,
            lag_seconds=lag,
            spans_processed=self._spans_processed,
            decode_failures=self._decode_failures,
            last_error=self._last_error,
            caught_up=self._caught_up,
        )

    async def start(self) -> None:
        """Load the checkpoint and start draining in a background task; idempotent."""
        if self._task is not None and not self._task.done():
            return
        async with self._engine.connect() as conn:
            self._checkpoint = await load_checkpoint(conn)
        await self._client.connect()
        self._stop_requested = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="span-poller")
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
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("span poller task failed", exc_info=error)
        log.info("span poller stopped", extra={"spans_processed": self._spans_processed})

    async def _run(self) -> None:
        """Drain, wait when caught up, back off after failures; until stop()."""
        failures = 0
        while not self._stop_requested.is_set():
            try:
                self._caught_up = await self._drain()
            except _Stopping:
                return
            except Exception as error:  # noqa: BLE001 (any failure: back off, retry from the checkpoint)
                failures += 1
                self._last_error = f"{type(error).__name__}: {error}"
                delay = self._backoff(failures)
                log.warning(
                    "span poller batch failed; retrying from the checkpoint",
                    extra={"error": self._last_error, "retry_in_seconds": round(delay, 3)},
                )
                await self._pause(delay)
                continue
            failures = 0
            self._last_error = None
            if self._caught_up:
                await self._pause(self._settings.poller_idle_wait_seconds)

    async def _drain(self) -> bool:
        """Read one stream from the checkpoint, committing batch by batch; True once caught up."""
        batch_size = self._settings.poller_batch_size
        read_size = batch_size * _BATCHES_PER_READ
        pending: list[SpanRecord] = []
        delivered = 0
        chunks = self._client.stream_chunks(self._checkpoint, read_size)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                delivered += len(chunk)
                pending.extend(chunk)
                while len(pending) >= batch_size:
                    await self._commit(pending[:batch_size])
                    del pending[:batch_size]
        if pending:
            await self._commit(pending)
        return delivered < read_size

    async def _commit(self, batch: list[SpanRecord]) -> None:
        """Hand the decodable records to the sink and move the checkpoint, in one transaction."""
        decodable, undecodable = partition_decodable(batch, self._catalog)
        last_key = batch[-1].key
        self._in_transaction = True
        try:
            async with self._engine.begin() as conn:
                if decodable:
                    await self._sink.handle(decodable, conn)
                await save_checkpoint(conn, last_key)
        finally:
            self._in_transaction = False
        for record in undecodable:
            log.warning("skipped a WAL entry that does not decode", extra={"key": record.key.hex()})
        self._checkpoint = last_key
        self._spans_processed += len(decodable)
        self._decode_failures += len(undecodable)
        if self._stop_requested.is_set():
            raise _Stopping

    def _backoff(self, failures: int) -> float:
        """Jittered exponential delay before retry number `failures`."""
        ceiling = min(
            self._settings.poller_max_backoff_seconds,
            _BACKOFF_INITIAL_SECONDS * 2 ** min(failures - 1, 30),
        )
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not crypto)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return as soon as stop() is asked for."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
