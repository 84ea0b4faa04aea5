"""`junjo-backend spans tail`: print decoded spans from the WAL, never moving the checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from junjo_backend.database import close_engine, create_engine
from junjo_backend.grpc_errors import IngestionError
from junjo_backend.ingestion_client import MAX_BATCH_SIZE, IngestionClient
from junjo_backend.poller import load_checkpoint
from junjo_backend.spans import ResourceCatalog, SpanRecord, ulid_millis, ulid_time

if TYPE_CHECKING:
    from typing import TextIO

    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

# A catch-up is "long" once the newest printed span is this far behind the clock; progress
# lines then go to stderr at most this often.
_PROGRESS_LAG_SECONDS = 5.0
_PROGRESS_EVERY_SECONDS = 2.0
_EXIT_INTERRUPTED = 130


def _timestamp(unix_nanos: int) -> str:
    """RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(unix_nanos / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _SpanPrinter:
    """Formats records as text columns or JSON lines."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool) -> None:
        self._out = out
        self._err = err
        self._as_json = as_json
        self._catalog = ResourceCatalog()

    def print(self, record: SpanRecord) -> None:
        """Write one line for `record`.

        The ingestion-service re-encodes every entry it sends and skips those it cannot
        decode, so a record's bytes always decode.
        """
        span = record.span()
        service = self._catalog.service_name(record.resource_bytes)
        start = span.start_time_unix_nano
        duration_ms = max(0, span.end_time_unix_nano - start) / 1e6
        if self._as_json:
            line = json.dumps(
                {
                    "key": record.key.hex(),
                    "ingested_at": _timestamp(ulid_millis(record.key) * 1_000_000),
                    "start_time": _timestamp(start),
                    "service": service,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "duration_ms": duration_ms,
                },
                ensure_ascii=False,
            )
        else:
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


def _database_missing(database_url: str) -> bool:
    """Whether the URL names a SQLite file that does not exist (opening it would create it)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return False
    if not url.database or url.database == ":memory:":
        return True
    return not Path(url.database).expanduser().exists()


async def _checkpoint_of(settings: Settings) -> bytes | None:
    """The poller's checkpoint, read only; None when there is no database or no checkpoint yet."""
    if _database_missing(settings.database_url):
        return None
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return await load_checkpoint(conn)
    except SQLAlchemyError:
        log.warning("could not read the poller's checkpoint; starting at the oldest entry")
        return None
    finally:
        await close_engine(engine)


async def run_tail(
    settings: Settings,
    *,
    from_start: bool,
    follow: bool,
    as_json: bool,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """Print spans after the checkpoint (or from the oldest); exit 0 at the end unless following."""
    err = err or sys.stderr
    printer = _SpanPrinter(out, err, as_json=as_json)
    progress = _CatchUpProgress(err)
    try:
        after = None if from_start else await _checkpoint_of(settings)
        async with IngestionClient(settings=settings) as client:
            while True:
                # The largest read: its end is the end of the WAL (ingestion_client.py).
                chunks = client.stream_chunks(after, MAX_BATCH_SIZE)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        for record in chunk:
                            printer.print(record)
                        out.flush()
                        after = chunk[-1].key
                        progress.advanced(len(chunk), after)
                progress.caught_up()
                if not follow:
                    return 0
                await asyncio.sleep(settings.poller_idle_wait_seconds)
    except IngestionError as error:
        err.write(f"spans tail: {error}\n")
        return 1
    except BrokenPipeError:  # `| head` closed the pipe: the reader has what it wanted
        return 0
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Ctrl-C: asyncio.run cancels this task; the client has been closed on the way out.
        return _EXIT_INTERRUPTED
