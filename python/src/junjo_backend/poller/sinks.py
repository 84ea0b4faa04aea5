"""Where the poller delivers spans: the sink protocol, the count-only sink, the store sink.

The span stores live in `junjo_backend.store` (the poller never imports it): `PollerStore`
is what the poller needs of one, and `store.base.SpanStore` has it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from junjo_backend.ingestion.spans import ResourceCatalog, ulid_millis

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from junjo_backend.ingestion.spans import SpanRecord

log = logging.getLogger(__name__)


@runtime_checkable
class PreparingSink(Protocol):
    """A sink that can make ready, ahead of time, the batch it will most likely get next."""

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """A hint with no effect on what is kept: `handle` may get another batch instead."""
        ...


class SpanSink(Protocol):
    """Where the poller delivers spans. `handle` runs inside the checkpoint's transaction."""

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        """Process `batch` (records in key order); write to the database through `conn`.

        The ingestion-service decodes and re-encodes every entry it sends and skips those it
        cannot decode, so the span and resource bytes of every record decode.

        Raising rolls back the transaction, leaves the checkpoint where it was, and the
        poller delivers the same records again after a backoff.
        """
        ...


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


class StoreTotals(Protocol):
    """A span store's totals (`store.base.StoreStats`)."""

    @property
    def spans_stored(self) -> int:
        """Rows in `spans`."""
        ...

    @property
    def set_aside(self) -> int:
        """Rows set aside."""
        ...

    @property
    def size_bytes(self) -> int | None:
        """Size on disk; None when unknown."""
        ...

    @property
    def watermark(self) -> bytes | None:
        """The last WAL key it holds."""
        ...


class PollerStore(Protocol):
    """What the poller needs of a span store (`store.base.SpanStore`; see there)."""

    async def open(self) -> None:
        """Open it; raises (`StoreUnavailable`) with a one-line reason when it cannot."""
        ...

    async def close(self) -> None:
        """Let go of it (closing twice is harmless)."""
        ...

    async def watermark(self) -> bytes | None:
        """The last WAL key it holds; b"" when it holds none; None: resume from the checkpoint."""
        ...

    async def write(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> object:
        """Store `batch` inside the checkpoint's transaction; raises on any failure."""
        ...

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """A hint that `batch` is likely the next `write` (it may convert it meanwhile)."""
        ...

    def stats(self) -> StoreTotals:
        """Its totals, without touching the database."""
        ...


class StoreSink:
    """Keeps every batch in a span store, and counts it per service as `ServiceTally` does.

    `store.write` runs inside the checkpoint's transaction, before the checkpoint commits
    (a DuckDB store commits its own transaction first): a failure raises, and the poller
    retries the batch from the checkpoint.
    """

    def __init__(
        self,
        store: PollerStore,
        *,
        tally: ServiceTally | None = None,
        sigkill_after_commits: int = 0,
    ) -> None:
        self._store = store
        self._tally = tally or ServiceTally()
        self._sigkill_after = sigkill_after_commits
        self._commits = 0

    @property
    def store(self) -> PollerStore:
        """The store batches go to."""
        return self._store

    @property
    def tally(self) -> ServiceTally:
        """The per-service counts."""
        return self._tally

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """The batch the poller will most likely hand over next (the store converts it)."""
        self._store.prepare(batch)

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        """Store the batch, then count it."""
        await self._store.write(batch, conn)
        self._commits += 1
        if self._sigkill_after and self._commits >= self._sigkill_after:
            # TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS (the fault suite): die exactly between
            # the store's commit and the checkpoint's, which no outside signal can aim at.
            log.warning("TEST_ONLY_SIGKILL_AFTER_STORE_COMMITS: killing this process now")
            os.kill(os.getpid(), signal.SIGKILL)
        await self._tally.handle(batch, conn)
