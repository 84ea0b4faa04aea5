"""Client for the Go ingestion-service's `InternalIngestionService.ReadSpans` server stream.

Each call runs a sync channel with `SingleThreadedUnaryStream` on a daemon thread of its
own, which hands `SpanRecord`s to the event loop in chunks through a bounded buffer: the
grpc.aio stub costs several times the CPU per message (docs/design/transport.md has the
measurements). A stream that breaks is resumed by this client with a new request after the
last key it handed out, since gRPC cannot retry a server stream once a message has come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

import grpc

from junjo_backend._wire.ingestion import ingestion_pb2, ingestion_pb2_grpc
from junjo_backend.backoff import backoff_delay
from junjo_backend.ingestion.errors import (
    IngestionClosedError,
    IngestionError,
    IngestionUnavailableError,
    answered_with,
    ingestion_error,
    is_connection_loss,
    rpc_status,
)
from junjo_backend.ingestion.spans import SpanRecord

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Iterator
    from types import TracebackType

    from junjo_backend.settings import Settings

log = logging.getLogger(__name__)

_Outcome = TypeVar("_Outcome")  # what a probe's thread hands back to the loop

# The value of grpc.experimental.ChannelOptions.SingleThreadedUnaryStream (the typing stubs
# do not describe grpc.experimental).
_SINGLE_THREADED_UNARY_STREAM = "SingleThreadedUnaryStream"
# The largest read the wire allows (batch_size is a uint32). It is also the only proof of
# the end of the WAL the wire gives: the ingestion-service counts an entry it cannot decode
# toward batch_size and sends nothing for it, so a stream that ends with fewer entries than
# asked for, even an empty one, may stop in front of a run of such entries. A read that
# asked for MAX_BATCH_SIZE and whose stream ended OK has seen every entry of the WAL after
# its start key (as of its read snapshot). The poller's `caught_up` and `spans tail` rest
# on this one definition.
MAX_BATCH_SIZE = 2**32 - 1

# A chunk goes to the event loop when it holds this many records, or when its first record
# has waited this long (so a slow trickle still reaches the caller promptly).
_CHUNK_RECORDS = 256
_CHUNK_MAX_AGE_SECONDS = 0.02
# Chunks read ahead of the caller: 48 x 256 records of ~1 KB, about 12 MB at most, more
# than one batch (POLLER_BATCH_SIZE, 10,000): the stream keeps coming while a batch commits.
_CHUNKS_AHEAD = 48

# What `reachable` reports is never older than this: older evidence reads as not known.
REACHABLE_MAX_AGE_SECONDS = 5.0

_RETRY_INITIAL_SECONDS = 0.05
_RETRY_MAX_SECONDS = 5.0
_CLOSE_JOIN_SECONDS = 2.0
# A call has at most a handful of operations due (message, status, metadata).
_MAX_DUE_EVENTS = 8


class _ResponseStream(Protocol):
    """What a sync unary-stream call gives back: an iterator that can be cancelled."""

    def __iter__(self) -> Iterator[ingestion_pb2.ReadSpansResponse]: ...
    def cancel(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class _StreamEnd:
    """The last item of a stream: how it ended."""

    error: grpc.RpcError | None = None
    closed: bool = False
    crash: Exception | None = None  # a bug in the worker, re-raised on the loop


class _StreamPipe:
    """Carries one call's chunks from its worker thread to the event loop.

    The worker blocks on a semaphore when `_CHUNKS_AHEAD` chunks wait unread, which is the
    back-pressure; `abandon()` (loop side) cancels the call and wakes the worker.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[list[SpanRecord] | _StreamEnd] = asyncio.Queue()
        self._slots = threading.Semaphore(_CHUNKS_AHEAD)
        self._abandoned = threading.Event()
        self._lock = threading.Lock()
        self._call: _ResponseStream | None = None

    # Worker side.

    def attach(self, call: _ResponseStream) -> bool:
        """Remember the call so `abandon()` can cancel it; False when already abandoned."""
        with self._lock:
            self._call = call
        return not self._abandoned.is_set()

    def detach(self) -> None:
        """The call has ended: `abandon()` must not cancel it any more (see `_cancel`)."""
        with self._lock:
            self._call = None

    def put(self, item: list[SpanRecord] | _StreamEnd) -> bool:
        """Hand an item to the loop, waiting for room; False when the reader has gone."""
        while not self._slots.acquire(timeout=1.0):
            if self._abandoned.is_set():
                return False
        if self._abandoned.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read
            self._abandoned.set()
            return False
        return True

    # Loop side.

    async def get(self) -> list[SpanRecord] | _StreamEnd:
        """The next chunk, or how the stream ended."""
        item = await self._queue.get()
        self._slots.release()
        return item

    def abandon(self) -> None:
        """Stop the call and the worker; a reader still waiting gets a closed end."""
        if self._abandoned.is_set():
            return
        self._abandoned.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._slots.release()  # wakes a worker waiting for room
        self._queue.put_nowait(_StreamEnd(closed=True))


class _RetryClock:
    """Jittered exponential backoff under one overall deadline, restarted by progress."""

    def __init__(self, deadline_seconds: float) -> None:
        self._deadline_seconds = deadline_seconds
        self._first_failure: float | None = None
        self._attempt = 0

    def progressed(self) -> None:
        """A call made progress: the next failure starts a fresh deadline."""
        self._first_failure = None
        self._attempt = 0

    @property
    def first_retry(self) -> bool:
        """Whether the delay just given was the first since the last progress."""
        return self._attempt == 1

    def next_delay(self) -> float | None:
        """How long to wait before the next attempt, or None when the deadline is spent."""
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        remaining = self._first_failure + self._deadline_seconds - now
        if remaining <= 0:
            return None
        self._attempt += 1
        delay = backoff_delay(
            self._attempt, initial=_RETRY_INITIAL_SECONDS, ceiling=_RETRY_MAX_SECONDS
        )
        return min(delay, remaining)


def _finish(call: _ResponseStream, *, cancel: bool) -> None:
    """Cancel `call` if asked, then poll the events it still has due, so that it can end.

    grpcio's single-threaded stream (`SingleThreadedUnaryStream`) marks itself done the
    moment it is cancelled and from then on raises without polling its private completion
    queue, so the operations still due there (at least the status) are never consumed: the
    call stays alive in grpc-core with its HTTP/2 connection, even after the channel is
    closed, and each such call kept about 14 KB. The poller stops a stream early at every
    settle window, so that was a leak per read. Reading on does not help (the rendezvous
    raises at once); polling its due events does, and they arrive at once after a cancel.
    grpcio 1.85 exposes no public way to do this, hence the private names, checked here.
    """
    if cancel:
        call.cancel()
    state = getattr(call, "_state", None)
    consume = getattr(call, "_consume_next_event", None)
    due = getattr(state, "due", None)
    if consume is None or not isinstance(due, set):
        return  # another grpcio: nothing we know how to poll
    for _ in range(_MAX_DUE_EVENTS):
        if not due:
            return
        with contextlib.suppress(grpc.RpcError):
            consume()


def _pump(call_factory: Callable[[], _ResponseStream], pipe: _StreamPipe) -> None:
    """Worker thread: read one ReadSpans stream into the pipe as chunks of records."""
    try:
        call = call_factory()
    except ValueError:  # the channel was closed under us
        pipe.put(_StreamEnd(closed=True))
        return
    if not pipe.attach(call):
        _finish(call, cancel=True)
        return
    chunk: list[SpanRecord] = []
    end = _StreamEnd()
    try:
        _pump_messages(call, pipe, chunk)
    except grpc.RpcError as error:  # abandon() may have cancelled it: see _finish
        _finish(call, cancel=False)
        end = _StreamEnd(error=error)
    except _ReaderGone:
        _finish(call, cancel=True)
        return
    except Exception as crash:  # noqa: BLE001 (handed to the loop, which re-raises it)
        _finish(call, cancel=True)
        end = _StreamEnd(crash=crash)
    finally:
        pipe.detach()
    if chunk and not pipe.put(chunk):
        return
    pipe.put(end)


class _ReaderGone(Exception):  # noqa: N818 (a signal between two functions, not an error)
    """The loop side abandoned the pipe."""


def _pump_messages(call: _ResponseStream, pipe: _StreamPipe, chunk: list[SpanRecord]) -> None:
    """Move messages into chunks and full chunks into the pipe; `chunk` keeps the remainder.

    This is the per-message hot path: keep it to a record, a length check and a clock read.
    """
    append = chunk.append
    monotonic = time.monotonic
    chunk_started = 0.0
    for message in call:
        if not chunk:
            chunk_started = monotonic()
        append(SpanRecord(message.key_ulid, message.span_bytes, message.resource_bytes))
        if len(chunk) >= _CHUNK_RECORDS or monotonic() - chunk_started >= _CHUNK_MAX_AGE_SECONDS:
            if not pipe.put(chunk.copy()):
                raise _ReaderGone
            chunk.clear()


class IngestionClient:
    """Reads spans from the ingestion-service's WAL over `ReadSpans`.

    Use `async with IngestionClient(...) as client:` or `connect()` / `close()`. Every call
    has a deadline (`INGESTION_CALL_TIMEOUT_SECONDS`); UNAVAILABLE and dropped connections are
    retried with jittered exponential backoff until `INGESTION_RETRY_DEADLINE_SECONDS` pass
    without progress; other failures raise an `IngestionError` carrying the status code.
    """

    def __init__(self, address: str | None = None, *, settings: Settings) -> None:
        self._settings = settings
        self.address = address or self._settings.ingestion_grpc_address
        self._channel: grpc.Channel | None = None
        self._stub: ingestion_pb2_grpc.InternalIngestionServiceStub | None = None
        self._closed = asyncio.Event()
        self._pipes: set[_StreamPipe] = set()
        self._workers: set[threading.Thread] = set()
        # Written from the event loop; the lock keeps the transitions whole for any thread.
        self._state_lock = threading.Lock()
        self._reachable: bool | None = None
        self._evidence_at: float | None = None  # monotonic: when a call last showed either
        self._unreachable_since: float | None = None
        self._last_error: str | None = None
        self._reconnects = 0
        self._stream_errors: dict[str, int] = {}

    async def __aenter__(self) -> Self:
        """Connect, for `async with`."""
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close, for `async with`."""
        await self.close()

    @property
    def reachable(self) -> bool | None:
        """Whether the last call reached the ingestion-service; None when that is not known.

        Any answer says yes, an error status included (`last_error` then names it); a lost
        connection or a call that got nothing before its deadline says no. Not known: no
        call yet, or the last evidence is older than `REACHABLE_MAX_AGE_SECONDS` (the
        poller's own reads, or its probe when it does not read, keep it fresher). Reading
        it starts nothing. (The channel's connectivity subscription was tried: grpcio's
        polling thread can outlive `unsubscribe` and raise "Channel closed" at close.)
        """
        seen_at = self._evidence_at
        if seen_at is None or time.monotonic() - seen_at > REACHABLE_MAX_AGE_SECONDS:
            return None
        return self._reachable

    def evidence_age(self) -> float | None:
        """Seconds since a call last showed whether the service is reachable; None: never."""
        seen_at = self._evidence_at
        return None if seen_at is None else time.monotonic() - seen_at

    @property
    def last_error(self) -> str | None:
        """The latest failure of a call (`CODE: details`); None once a call succeeds."""
        return self._last_error

    @property
    def reconnects(self) -> int:
        """Times the ingestion-service became reachable again after being unreachable."""
        return self._reconnects

    @property
    def stream_errors(self) -> dict[str, int]:
        """ReadSpans calls that ended with an error, by gRPC status code name."""
        return dict(self._stream_errors)

    def _seen(self, *, reachable: bool, error: str | None = None) -> None:
        """Record what a call showed (`error`: the status it failed with, if any).

        `last_error` is always the latest failure; the way back from an outage is logged.
        """
        with self._state_lock:
            before = self._reachable
            self._evidence_at = time.monotonic()
            self._reachable = reachable
            self._last_error = error
            if not reachable:
                if before is not False:
                    self._unreachable_since = time.monotonic()
                return
            if before is not False:
                return
            since, self._unreachable_since = self._unreachable_since, None
            self._reconnects += 1
        fields: dict[str, object] = {"address": self.address}
        if since is not None:
            fields["unreachable_seconds"] = round(time.monotonic() - since, 3)
        log.info("ingestion-service reachable again", extra=fields)

    async def connect(self) -> None:
        """Create the channel (connections are made lazily by the first call); idempotent."""
        if self._channel is not None:
            return
        settings = self._settings
        keepalive_ms = int(settings.ingestion_keepalive_time_seconds * 1000)
        options: list[tuple[str, str | int]] = [
            (_SINGLE_THREADED_UNARY_STREAM, 1),
            ("grpc.max_receive_message_length", settings.ingestion_max_message_bytes),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", min(keepalive_ms, 20_000)),
            # Our own loop retries and resumes: a transparent retry by grpc-core could not
            # resume a stream after its first message anyway.
            ("grpc.enable_retries", 0),
            # grpc-core's reconnect backoff grows to 120 s by default, and fail-fast calls
            # fail without trying until it runs out: keep it near our own retry pace so a
            # restarted ingestion-service is seen within seconds.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(_RETRY_MAX_SECONDS * 1000)),
        ]
        self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = ingestion_pb2_grpc.InternalIngestionServiceStub(self._channel)
        self._closed = asyncio.Event()
        log.info("ingestion client ready", extra={"address": self.address})

    async def close(self) -> None:
        """Cancel calls under way, stop their threads and close the channel; idempotent."""
        channel = self._channel
        if channel is None:
            return
        self._channel = None
        self._stub = None
        self._closed.set()
        for pipe in list(self._pipes):
            pipe.abandon()
        channel.close()
        # Cancelled calls end at once; the bound only guards against a thread stuck in C.
        stuck = await asyncio.to_thread(_join_all, list(self._workers), _CLOSE_JOIN_SECONDS)
        if stuck:
            log.warning(
                "ingestion stream threads still running after close", extra={"threads": stuck}
            )
        self._workers.clear()
        log.info("ingestion client closed", extra={"address": self.address})

    async def check_connection(self, timeout: float = 1.0) -> bool:  # noqa: ASYNC109 (the call's gRPC deadline)
        """Whether the ingestion-service answers ReadSpans (batch_size 0) within `timeout`.

        A call of its own: for start-up, the CLI and the poller's probe while it does not
        read; never made by `/health` (see `reachable`).
        """
        answered, _ = await self.probe(timeout)
        return answered

    async def probe(
        self,
        timeout: float = 1.0,  # noqa: ASYNC109 (the call's gRPC deadline)
        *,
        after: bytes | None = None,
        records: int = 0,
    ) -> tuple[bool, bytes | None]:
        """A short ReadSpans of its own: whether it succeeded, and the last key it brought.

        `records` entries after `after` at most (0: none, a pure reachability check). A
        standby asks for one to watch the WAL move on while another replica drains it.
        """
        stub = self._stub
        if stub is None:
            return False, None
        request = ingestion_pb2.ReadSpansRequest(start_key_ulid=after or b"", batch_size=records)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[tuple[bool, str | None, bytes | None]] = loop.create_future()

        def call() -> None:
            outcome: tuple[bool, str | None, bytes | None]
            last_key: bytes | None = None
            try:
                for response in stub.ReadSpans(request, timeout=timeout, wait_for_ready=False):
                    last_key = response.key_ulid
                outcome = (True, None, last_key)
            except grpc.RpcError as error:
                code, details = rpc_status(error)
                log.debug(
                    "ingestion-service probe failed", extra={"code": code.name, "details": details}
                )
                outcome = (answered_with(code, details), f"{code.name}: {details}", None)
            except ValueError:  # closed channel
                outcome = (False, "the ingestion client was closed", None)
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting
                loop.call_soon_threadsafe(_answer_once, answered, outcome)

        self._start_worker(call)
        reachable, failure, key = await answered
        self._seen(reachable=reachable, error=failure)
        return failure is None, key

    async def read_spans(self, start_key: bytes | None, batch_size: int = 100) -> list[SpanRecord]:
        """Up to `batch_size` records after `start_key` (None or b"": from the oldest), in order."""
        records: list[SpanRecord] = []
        async with contextlib.aclosing(self.stream_chunks(start_key, batch_size)) as chunks:
            async for chunk in chunks:
                records.extend(chunk)
        return records

    async def stream_spans(
        self, start_key: bytes | None, batch_size: int
    ) -> AsyncGenerator[SpanRecord, None]:
        """Like `read_spans`, yielding records as they arrive; close it early with `aclosing`."""
        async with contextlib.aclosing(self.stream_chunks(start_key, batch_size)) as chunks:
            async for chunk in chunks:
                for record in chunk:
                    yield record

    async def stream_chunks(
        self, start_key: bytes | None, batch_size: int
    ) -> AsyncGenerator[list[SpanRecord], None]:
        """Like `stream_spans`, in lists of records: the cheap form for bulk readers.

        If the stream breaks, it is resumed after the last key yielded, asking for what is
        left of `batch_size`: the caller sees no duplicate and no gap.
        """
        if not 0 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 0 and {MAX_BATCH_SIZE}")
        after = start_key or b""
        remaining = batch_size
        retry = _RetryClock(self._settings.ingestion_retry_deadline_seconds)
        while remaining > 0:
            pipe = self._open_stream(after, remaining)
            progressed = False
            try:
                while True:
                    item = await pipe.get()
                    if isinstance(item, _StreamEnd):
                        break
                    after = item[-1].key
                    remaining -= len(item)
                    if not progressed:
                        progressed = True
                        self._seen(reachable=True)
                    else:
                        self._evidence_at = time.monotonic()  # a long stream stays fresh
                    retry.progressed()
                    yield item
            finally:
                pipe.abandon()
                self._pipes.discard(pipe)
            if item.crash is not None:
                raise item.crash
            if item.closed or self._closed.is_set():
                raise IngestionClosedError(
                    grpc.StatusCode.CANCELLED, "the ingestion client was closed"
                )
            if item.error is None:
                self._seen(reachable=True)
                return
            code_name = rpc_status(item.error)[0].name
            self._stream_errors[code_name] = self._stream_errors.get(code_name, 0) + 1
            await self._before_retry(item.error, retry, progressed=progressed)

    async def _before_retry(
        self, error: grpc.RpcError, retry: _RetryClock, *, progressed: bool
    ) -> None:
        """Raise the typed error for a failed call, or wait before resuming it."""
        code, details = rpc_status(error)
        # A deadline after messages did flow means a long stream, not a dead server: resume.
        resumable = is_connection_loss(code, details) or (
            progressed and code is grpc.StatusCode.DEADLINE_EXCEEDED
        )
        if code is not grpc.StatusCode.DEADLINE_EXCEEDED or not progressed:
            self._seen(reachable=answered_with(code, details), error=f"{code.name}: {details}")
        if not resumable:
            raise ingestion_error(code, details)
        delay = retry.next_delay()
        if delay is None:
            raise IngestionUnavailableError(
                code,
                f"{details} (still failing after INGESTION_RETRY_DEADLINE_SECONDS="
                f"{self._settings.ingestion_retry_deadline_seconds:g})",
            )
        # One line per outage at INFO; the retries after it (several a second at first)
        # only at DEBUG, so a stopped ingestion-service does not flood the log.
        log.log(
            logging.INFO if retry.first_retry else logging.DEBUG,
            "ingestion stream interrupted, resuming",
            extra={"code": code.name, "details": details, "retry_in_seconds": round(delay, 3)},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)
        if self._closed.is_set():
            raise IngestionClosedError(grpc.StatusCode.CANCELLED, "the ingestion client was closed")

    def _open_stream(self, after: bytes, batch_size: int) -> _StreamPipe:
        """Start one ReadSpans call on a worker thread; its records arrive through the pipe."""
        stub = self._stub
        if stub is None:
            if self._closed.is_set():
                raise IngestionClosedError(
                    grpc.StatusCode.CANCELLED, "the ingestion client was closed"
                )
            raise RuntimeError("IngestionClient is not connected: call connect() first")
        request = ingestion_pb2.ReadSpansRequest(start_key_ulid=after, batch_size=batch_size)
        timeout = self._settings.ingestion_call_timeout_seconds
        wait_for_ready = self._settings.ingestion_wait_for_ready
        pipe = _StreamPipe(asyncio.get_running_loop())
        self._pipes.add(pipe)

        def call_factory() -> _ResponseStream:
            return stub.ReadSpans(request, timeout=timeout, wait_for_ready=wait_for_ready)

        self._start_worker(lambda: _pump(call_factory, pipe))
        return pipe

    def _start_worker(self, target: Callable[[], None]) -> None:
        """Run `target` on a daemon thread (one never holds up interpreter exit)."""
        self._workers = {worker for worker in self._workers if worker.is_alive()}
        worker = threading.Thread(target=target, name="ingestion-stream", daemon=True)
        self._workers.add(worker)
        worker.start()


def _join_all(workers: list[threading.Thread], seconds: float) -> int:
    """Wait up to `seconds` in all for the threads to end; how many are still running."""
    give_up = time.monotonic() + seconds
    for worker in workers:
        worker.join(max(0.0, give_up - time.monotonic()))
    return sum(worker.is_alive() for worker in workers)


def _answer_once(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    """Resolve the probe's future with its outcome, unless it was cancelled meanwhile."""
    if not future.done():
        future.set_result(outcome)


__all__ = [
    "MAX_BATCH_SIZE",
    "IngestionClient",
    "IngestionError",
]
