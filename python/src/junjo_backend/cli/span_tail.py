"""`junjo-backend spans tail`: print decoded spans from the WAL, never moving the checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from opentelemetry.proto.trace.v1 import trace_pb2
from sqlalchemy.exc import SQLAlchemyError

from junjo_backend.cli.console import EXIT_FAILED, EXIT_INTERRUPTED
from junjo_backend.database import (
    close_engine,
    create_engine,
    database_label,
    sqlite_file,
)
from junjo_backend.failures import describe_error
from junjo_backend.ingestion.client import MAX_BATCH_SIZE, IngestionClient
from junjo_backend.ingestion.errors import IngestionError, IngestionUnavailableError
from junjo_backend.ingestion.spans import ResourceCatalog, SpanRecord, ulid_millis, ulid_time
from junjo_backend.poller.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import TextIO

    from opentelemetry.proto.common.v1 import common_pb2

    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

# A catch-up is "long" once the newest printed span is this far behind the clock; progress
# lines then go to stderr at most this often.
_PROGRESS_LAG_SECONDS = 5.0
_PROGRESS_EVERY_SECONDS = 2.0
# How long one reachability probe may take, and the pause between probes while waiting.
_PROBE_SECONDS = 1.0
_PROBE_INTERVAL_SECONDS = 0.5


def _timestamp(unix_nanos: int) -> str:
    """RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(unix_nanos / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_TEXT_HEADER = "START_TIME                SERVICE  TRACE_ID  SPAN_ID  NAME  DURATION"


def _any_value(value: common_pb2.AnyValue) -> object:
    """An OTLP attribute value as JSON: strings, numbers, booleans, lists, maps; bytes as hex."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, object]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


class _SpanPrinter:
    """Formats records as text columns (after a header) or JSON lines."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self._out = out
        self._as_json = as_json
        self._catalog = ResourceCatalog()
        self._header_written = as_json

    def print(self, record: SpanRecord) -> None:
        """Write one line for `record`.

        The ingestion-service re-encodes every entry it sends and skips those it cannot
        decode, so a record's bytes always decode.
        """
        span = record.span()
        service = self._catalog.service_name(record.resource_bytes)
        resource = self._catalog.resource(record.resource_bytes)
        start = span.start_time_unix_nano
        duration_ms = max(0, span.end_time_unix_nano - start) / 1e6
        if self._as_json:
            line = json.dumps(
                {
                    "key": record.key.hex(),
                    "ingested_at": _timestamp(ulid_millis(record.key) * 1_000_000),
                    "start_time": _timestamp(start),
                    "end_time": _timestamp(span.end_time_unix_nano),
                    "service": service,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": trace_pb2.Span.SpanKind.Name(span.kind),
                    "duration_ms": duration_ms,
                    "status": {
                        "code": trace_pb2.Status.StatusCode.Name(span.status.code),
                        "message": span.status.message,
                    },
                    "attributes": _attributes(span.attributes),
                    "resource": _attributes(resource.attributes),
                },
                ensure_ascii=False,
            )
        else:
            if not self._header_written:
                self._out.write(_TEXT_HEADER + "\n")
                self._header_written = True
            line = (
                f"{_timestamp(start)}  {service}  {span.trace_id.hex()}  {span.span_id.hex()}"
                f"  {span.name}  {duration_ms:.3f}ms"
            )
        self._out.write(line + "\n")


class _CatchUpProgress:
    """Progress lines on stderr while the tail is far behind the WAL's newest entries."""

    def __init__(self, err: TextIO) -> None:
        self._err = err
        self._shown = False
        self._last_shown = 0.0
        self._printed = 0

    def advanced(self, count: int, last_key: bytes) -> None:
        """`count` more spans were printed, the newest with `last_key`."""
        self._printed += count
        now = time.monotonic()
        lag = time.time() - ulid_millis(last_key) / 1000
        if lag >= _PROGRESS_LAG_SECONDS and now - self._last_shown >= _PROGRESS_EVERY_SECONDS:
            self._shown = True
            self._last_shown = now
            at = ulid_time(last_key).isoformat(timespec="seconds")
            self._err.write(
                f"catching up: {self._printed} spans so far, at {at} ({lag:.0f}s behind)\n"
            )
            self._err.flush()

    def caught_up(self) -> None:
        """The end of the WAL was reached."""
        if self._shown:
            self._err.write(f"caught up after {self._printed} spans\n")
            self._err.flush()
            self._shown = False


async def _checkpoint_of(settings: Settings, note: Callable[[str], None]) -> bytes | None:
    """The poller's checkpoint, read only; None when there is no database or no checkpoint yet.

    A missing SQLite file is not created: the tail then starts at the oldest entry.
    """
    note(f"database: {database_label(settings.database_url)}")
    path = sqlite_file(settings.database_url)
    if path is not None and not path.exists():
        note(f"no database at {path}: no checkpoint, starting at the oldest entry")
        return None
    engine = create_engine(
        settings.database_url,
        connect_timeout_seconds=settings.database_connect_timeout_seconds,
        create_missing=False,
    )
    try:
        async with asyncio.timeout(settings.database_connect_timeout_seconds):
            async with engine.connect() as conn:
                return await load_checkpoint(conn)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        note(
            f"could not read the poller's checkpoint ({describe_error(exc)}); "
            "starting at the oldest entry"
        )
        return None
    finally:
        await close_engine(engine, quiet=True)


class _ServiceUnreachable(Exception):  # noqa: N818 (control flow, turned into an error line)
    """Nothing answered at the address within the timeout (without --follow)."""


async def _wait_for_service(
    client: IngestionClient,
    address: str,
    *,
    follow: bool,
    timeout: float,  # noqa: ASYNC109 (a bound on waiting, not one call)
    err: TextIO,
) -> None:
    """Return once the ingestion-service answers; say at once that we wait when it does not.

    Without `follow`, give up after `timeout` seconds; with it, wait as long as it takes.
    """
    probe = min(timeout, _PROBE_SECONDS)
    if await client.check_connection(probe):
        return
    err.write(f"waiting for the ingestion-service at {address}\n")
    err.flush()
    deadline = time.monotonic() + timeout
    while True:
        if not follow and time.monotonic() >= deadline:
            raise _ServiceUnreachable
        await asyncio.sleep(_PROBE_INTERVAL_SECONDS)
        if await client.check_connection(probe):
            err.write(f"connected to the ingestion-service at {address}\n")
            err.flush()
            return


@dataclass(slots=True)
class _Tail:
    """One `spans tail` run: where it reads from, what it prints, what it notes at the end."""

    address: str
    timeout: float
    follow: bool
    from_start: bool
    idle_wait: float
    out: TextIO
    err: TextIO
    printer: _SpanPrinter
    progress: _CatchUpProgress
    notes: list[str] = field(default_factory=list)
    after: bytes | None = None  # the key of the last span printed (or the checkpoint)

    async def run(self, client: IngestionClient) -> None:
        """Read to the end of the WAL; with `follow`, again and again, through outages."""
        await self._wait_for_service(client, follow=self.follow)
        first_read = True
        while True:
            delivered = await self._read_to_end(client)
            if delivered is None:  # an outage, waited out: read on from where it broke
                continue
            if first_read and delivered == 0 and not self.from_start:
                at = "the start" if self.after is None else ulid_time(self.after).isoformat()
                self.notes.append(
                    f"no spans after the poller's checkpoint ({at}); "
                    "--from-start shows the whole WAL"
                )
            first_read = False
            self.progress.caught_up()
            if not self.follow:
                return
            await asyncio.sleep(self.idle_wait)

    async def _read_to_end(self, client: IngestionClient) -> int | None:
        """Print every span after `after`; how many, or None when an outage was waited out."""
        delivered = 0
        try:
            # The largest read: its end is the end of the WAL (ingestion/client.py).
            chunks = client.stream_chunks(self.after, MAX_BATCH_SIZE)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    for record in chunk:
                        self.printer.print(record)
                    self.out.flush()
                    delivered += len(chunk)
                    self.after = chunk[-1].key
                    self.progress.advanced(len(chunk), self.after)
        except IngestionUnavailableError:
            if not self.follow:
                raise
            await self._wait_for_service(client, follow=True)
            return None
        return delivered

    async def _wait_for_service(self, client: IngestionClient, *, follow: bool) -> None:
        await _wait_for_service(
            client, self.address, follow=follow, timeout=self.timeout, err=self.err
        )


def _tail_settings(settings: Settings, address: str, timeout: float) -> Settings:
    # A stream that breaks is resumed for `timeout` seconds at most; past that, without
    # --follow the tail gives up, and with it waits (one line per outage) and goes on.
    return settings.model_copy(
        update={"ingestion_grpc_address": address, "ingestion_retry_deadline_seconds": timeout}
    )


def _failure(error: Exception, address: str, timeout: float) -> str:
    if isinstance(error, _ServiceUnreachable):
        return (
            f"nothing answered at {address} within {timeout:g} s "
            "(--address, --timeout; --follow waits)"
        )
    return f"the ingestion-service at {address}: {error}"


class _Discard(io.StringIO):
    """A stream that keeps nothing (the informational lines of `spans tail -q`)."""

    def write(self, text: str) -> int:
        """Drop `text`."""
        return len(text)


async def run_tail(
    settings: Settings,
    *,
    from_start: bool,
    follow: bool,
    as_json: bool,
    out: TextIO,
    err: TextIO | None = None,
    address: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (how long to wait for the service, not one call)
    quiet: bool = False,
) -> int:
    """Print spans after the checkpoint (or from the oldest); exit 0 at the end unless following.

    Errors are one `error:` line on stderr; informational lines follow on stderr unless `quiet`.
    """
    err = err or sys.stderr
    source = "--address" if address else "INGESTION_GRPC_ADDRESS"  # what an error blames
    address = address or settings.ingestion_grpc_address
    settings = _tail_settings(settings, address, timeout)
    info = _Discard() if quiet else err  # -q: only the spans and the error line
    tail = _Tail(
        address=address,
        timeout=timeout,
        follow=follow,
        from_start=from_start,
        idle_wait=settings.poller_idle_wait_seconds,
        out=out,
        err=info,
        printer=_SpanPrinter(out, as_json=as_json),
        progress=_CatchUpProgress(info),
    )
    try:
        tail.after = None if from_start else await _checkpoint_of(settings, tail.notes.append)
        async with IngestionClient(settings=settings) as client:
            await tail.run(client)
    except (_ServiceUnreachable, IngestionError) as error:
        err.write(f"error: {source}: {_failure(error, address, timeout)}\n")
        return EXIT_FAILED
    except BrokenPipeError:  # `| head` closed the pipe: the reader has what it wanted
        return 0
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Ctrl-C: asyncio.run cancels this task, the command's only one, so no caller is
        # left waiting on the cancellation, and the client was closed on the way out.
        log.debug("spans tail interrupted", extra={"exit_status": EXIT_INTERRUPTED})
        return EXIT_INTERRUPTED
    finally:
        for line in tail.notes:
            info.write(line + "\n")
    return 0
