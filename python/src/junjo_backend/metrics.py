"""Prometheus metrics: what `/metrics` serves (README, "Metrics", lists each one).

One `CollectorRegistry` per backend, not prometheus_client's process-wide default: each
lifespan (and each test) counts on its own, so two backends in one process neither add to
each other's counters nor fail on registering the same names twice.

Two kinds of metric, so the hot paths pay almost nothing:

- ValidateApiKey outcomes are counted as calls happen, on label children bound once
  (`AuthCallMetrics`): a call costs one counter increment and one histogram observation.
- Everything else is read at scrape time from the objects that keep the numbers anyway
  (the key snapshot, the poller, the ingestion client) by `BackendCollector`: the span
  drain does no metric work at all.

No metric carries key material, and no label is derived from a key.
"""

from __future__ import annotations

import math
import platform
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Info, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from junjo_backend import __version__
from junjo_backend.auth.metrics import AuthCallMetrics
from junjo_backend.ingestion.spans import ulid_time

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from junjo_backend.auth.known_keys import KnownKeys
    from junjo_backend.ingestion.client import IngestionClient
    from junjo_backend.poller.loop import PollerStatus, SpanPoller

# The text format every Prometheus version scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class BackendCollector:
    """Reads the key snapshot, the poller and the ingestion client at scrape time.

    The poller and the ingestion client are None when `POLLER_ENABLED=false`: their metrics
    are then absent rather than zero (nothing is watched).
    """

    def __init__(
        self,
        keys: KnownKeys,
        poller: SpanPoller | None = None,
        ingestion: IngestionClient | None = None,
    ) -> None:
        self._keys = keys
        self._poller = poller
        self._ingestion = ingestion

    def collect(self) -> Iterator[Metric]:
        """The current values (prometheus_client calls this on every scrape)."""
        yield from self._key_metrics()
        if self._poller is not None:
            yield from self._poller_metrics(self._poller)
            yield from self._store_metrics(self._poller)
        if self._ingestion is not None:
            yield from self._ingestion_metrics(self._ingestion)

    def _key_metrics(self) -> Iterator[Metric]:
        keys = self._keys
        yield _gauge(
            "junjo_api_keys_snapshot_age_seconds",
            "Age of the in-memory snapshot of api_keys (+Inf when there is none: "
            "no read has succeeded since the last failure)",
            keys.age(),
        )
        yield _gauge("junjo_api_keys_snapshot_keys", "API keys in the current snapshot", keys.size)
        yield _counter("junjo_api_keys_reads", "Reads of the api_keys table", keys.reads)
        yield _counter(
            "junjo_api_keys_read_failures", "Reads of the api_keys table that failed", keys.failures
        )

    def _poller_metrics(self, poller: SpanPoller) -> Iterator[Metric]:
        status = poller.status
        yield from _poller_progress(status)
        yield from _poller_position(status)

    def _store_metrics(self, poller: SpanPoller) -> Iterator[Metric]:
        store = poller.store
        if store is None:  # SPAN_STORE=none: nothing is kept, nothing to show
            return
        totals = store.stats()
        yield _gauge(
            "junjo_store_open",
            "1 while this replica holds the span store open (its leader does)",
            poller.store_open,
        )
        yield _gauge(
            "junjo_store_unavailable",
            "1 while the span store could not be opened at the last try (the poller does not "
            "drain)",
            poller.store_error is not None,
        )
        yield _gauge(
            "junjo_store_spans", "Rows in the span store's spans table", totals.spans_stored
        )
        yield _gauge(
            "junjo_store_spans_set_aside",
            "Spans the store set aside (input the Go backend could not store)",
            totals.set_aside,
        )
        if totals.size_bytes is not None:
            yield _gauge(
                "junjo_store_size_bytes", "The span store's size on disk", totals.size_bytes
            )
        if totals.watermark is not None:
            yield _gauge(
                "junjo_store_watermark_timestamp_seconds",
                "When the ingestion-service received the last span the store holds (its "
                "watermark's WAL key time, Unix seconds)",
                ulid_time(totals.watermark).timestamp(),
            )

    def _ingestion_metrics(self, ingestion: IngestionClient) -> Iterator[Metric]:
        reachable = ingestion.reachable
        if reachable is not None:
            yield _gauge(
                "junjo_ingestion_reachable",
                "1 when the poller's last call reached the ingestion-service",
                reachable,
            )
        yield _counter(
            "junjo_ingestion_reconnects",
            "Times the ingestion-service became reachable again after being unreachable",
            ingestion.reconnects,
        )
        errors = CounterMetricFamily(
            "junjo_ingestion_stream_errors",
            "ReadSpans calls that ended with an error status, by gRPC status code",
            labels=["code"],
        )
        for code, count in sorted(ingestion.stream_errors.items()):
            errors.add_metric([code], count)
        yield errors


def _poller_progress(status: PollerStatus) -> Iterator[Metric]:
    """Whether the poller runs and leads, and what it has done since start."""
    yield _gauge("junjo_poller_running", "1 while the span poller runs", status.running)
    yield _counter(
        "junjo_poller_spans_processed",
        "WAL entries delivered to the sink and checkpointed",
        status.spans_processed,
    )
    yield _counter(
        "junjo_poller_batches_committed",
        "Checkpoint transactions committed",
        status.batches_committed,
    )
    yield _counter(
        "junjo_poller_entries_skipped",
        "WAL entries the ingestion-service skipped (they do not decode), as the "
        "poller's reads prove it: a lower bound",
        status.entries_skipped,
    )
    yield _gauge(
        "junjo_poller_leader",
        "1 while this replica leads (drains the WAL), 0 while it stands by",
        status.role == "leader",
    )
    if status.role_since is not None:
        yield _gauge(
            "junjo_poller_role_changed_timestamp_seconds",
            "When this replica became the leader (Unix seconds; absent on a standby)",
            status.role_since.timestamp(),
        )


def _poller_position(status: PollerStatus) -> Iterator[Metric]:
    """Where the poller stands: caught up or how far behind, and its checkpoint's time."""
    caught_up = status.caught_up
    yield _gauge(
        "junjo_poller_caught_up",
        "1 when nothing older than the settle window is unread, 0 when behind, NaN while "
        "not known (a standby; the ingestion-service unreachable or failing)",
        math.nan if caught_up is None else float(caught_up),
    )
    if status.last_key_received_at is not None:
        yield _gauge(
            "junjo_poller_checkpoint_timestamp_seconds",
            "When the ingestion-service received the last processed span (its WAL key's "
            "time, Unix seconds)",
            status.last_key_received_at.timestamp(),
        )
    if status.backlog_age_seconds is not None:
        yield _gauge(
            "junjo_poller_backlog_age_seconds",
            "0 when caught up; while behind, the age of the oldest span read but not yet "
            "processed (absent while not known)",
            status.backlog_age_seconds,
        )


class BackendMetrics:
    """The registry of one backend: build info, process figures, auth calls, the rest at scrape."""

    def __init__(self) -> None:
        # No `*_created` series (a timestamp per counter and histogram that no dashboard
        # reads). prometheus-client has this switch only process-wide: every registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (read from /proc).
        ProcessCollector(registry=self.registry)
        Info("junjo_build", "The running backend", registry=self.registry).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        self.auth = AuthCallMetrics(self.registry)

    def watch(
        self,
        keys: KnownKeys,
        poller: SpanPoller | None = None,
        ingestion: IngestionClient | None = None,
    ) -> None:
        """Read these parts at every scrape."""
        self.registry.register(BackendCollector(keys, poller, ingestion))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
