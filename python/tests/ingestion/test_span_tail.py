"""`junjo-backend spans tail` against the in-process ingestion server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from sqlalchemy.engine import make_url

from harness.waiting import wait_until
from junjo_backend.cli.span_tail import run_tail
from junjo_backend.poller.checkpoint import load_checkpoint, save_checkpoint

from .fake_ingestion import (
    FakeIngestionServer,
    FakeIngestionService,
    FakeWal,
    UlidGenerator,
    make_resource,
    make_span,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.settings import Settings

TRACE_ID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SPAN_ID = bytes.fromhex("b7ad6b7169203331")
START_NANOS = 1_717_171_717_123_000_000  # 2024-05-31T16:08:37.123Z


def seed_known_span(wal: FakeWal) -> bytes:
    span = make_span(
        "GET /orders/{id}",
        start_unix_nano=START_NANOS,
        duration_nanos=12_345_678,
        trace_id=TRACE_ID,
        span_id=SPAN_ID,
    )
    return wal.append(span.SerializeToString(), make_resource("orders").SerializeToString())


async def tail(
    settings: Settings, *, from_start: bool = True, as_json: bool = False
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_tail(
        settings, from_start=from_start, follow=False, as_json=as_json, out=out, err=err
    )
    return code, out.getvalue(), err.getvalue()


async def test_text_lines(settings: Settings, wal: FakeWal) -> None:
    seed_known_span(wal)
    wal.seed(2)

    code, out, err = await tail(settings)

    assert code == 0
    assert err == ""
    header, first, *rest = out.splitlines()
    assert header.split() == ["START_TIME", "SERVICE", "TRACE_ID", "SPAN_ID", "NAME", "DURATION"]
    assert first.split("  ") == [
        "2024-05-31T16:08:37.123Z",
        "orders",
        TRACE_ID.hex(),
        SPAN_ID.hex(),
        "GET /orders/{id}",
        "12.346ms",
    ]
    assert len(rest) == 2


async def test_json_lines(settings: Settings, wal: FakeWal) -> None:
    key = seed_known_span(wal)

    code, out, _ = await tail(settings, as_json=True)

    assert code == 0
    [line] = out.splitlines()
    record = json.loads(line)
    assert record["key"] == key.hex()
    assert record["service"] == "orders"
    assert record["trace_id"] == TRACE_ID.hex()
    assert record["span_id"] == SPAN_ID.hex()
    assert record["name"] == "GET /orders/{id}"
    assert record["start_time"] == "2024-05-31T16:08:37.123Z"
    assert record["duration_ms"] == 12.345678
    assert record["ingested_at"].endswith("Z")
    assert record["end_time"] == "2024-05-31T16:08:37.135Z"
    assert record["kind"] == "SPAN_KIND_SERVER"
    assert record["status"] == {"code": "STATUS_CODE_UNSET", "message": ""}
    assert record["attributes"] == {"http.route": "GET /orders/{id}", "http.status_code": 200}
    assert record["resource"]["service.name"] == "orders"


async def test_json_carries_attributes_status_kind_and_resource(
    settings: Settings, wal: FakeWal
) -> None:
    span = make_span("work", start_unix_nano=START_NANOS, duration_nanos=1_000_000)
    del span.attributes[:]
    span.kind = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT
    span.status.code = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
    span.status.message = "boom"
    span.attributes.add(key="http.status", value=common_pb2.AnyValue(int_value=503))
    span.attributes.add(
        key="tags",
        value=common_pb2.AnyValue(
            array_value=common_pb2.ArrayValue(
                values=[common_pb2.AnyValue(string_value="a"), common_pb2.AnyValue(bool_value=True)]
            )
        ),
    )
    span.attributes.add(key="raw", value=common_pb2.AnyValue(bytes_value=b"\x01\x02"))
    resource = make_resource("orders")
    resource.attributes.add(key="host", value=common_pb2.AnyValue(string_value="h1"))
    wal.append(span.SerializeToString(), resource.SerializeToString())

    code, out, _ = await tail(settings, as_json=True)

    assert code == 0
    record = json.loads(out)
    assert record["kind"] == "SPAN_KIND_CLIENT"
    assert record["status"] == {"code": "STATUS_CODE_ERROR", "message": "boom"}
    assert record["attributes"] == {"http.status": 503, "tags": ["a", True], "raw": "0102"}
    assert record["resource"] == {"service.name": "orders", "host": "h1"}


async def test_empty_wal_exits_at_once(settings: Settings) -> None:
    assert await tail(settings) == (0, "", "")


async def test_starts_after_the_checkpoint_and_never_moves_it(
    settings: Settings, wal: FakeWal, engine: AsyncEngine
) -> None:
    keys = wal.seed(5)
    async with engine.begin() as conn:
        await save_checkpoint(conn, keys[1])

    code, out, _ = await tail(settings, from_start=False, as_json=True)

    assert code == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == [k.hex() for k in keys[2:]]
    async with engine.connect() as conn:
        assert await load_checkpoint(conn) == keys[1]


async def test_without_a_database_it_starts_at_the_oldest_and_creates_nothing(
    settings: Settings, wal: FakeWal
) -> None:
    wal.seed(3)

    code, out, err = await tail(settings, from_start=False)

    assert code == 0
    assert len(out.splitlines()) == 1 + 3  # the header, then the spans
    database = make_url(settings.database_url).database
    assert database is not None
    assert not await asyncio.to_thread(Path(database).exists)
    assert not await asyncio.to_thread(Path(database).parent.exists)
    assert f"database: {Path(database)}" in err.splitlines()
    assert f"no database at {Path(database)}" in err


async def test_unreadable_database_falls_back_to_the_oldest_entry(
    make_settings: Callable[..., Settings],
    ingestion_server: FakeIngestionServer,
    wal: FakeWal,
    tmp_path: Path,
) -> None:
    wal.seed(2)
    not_a_database = tmp_path / "junk.db"
    not_a_database.write_bytes(b"this is not SQLite" * 100)
    settings = make_settings(
        ingestion_grpc_address=ingestion_server.address,
        database_url=f"sqlite+aiosqlite:///{not_a_database}",
    )

    code, out, err = await tail(settings, from_start=False)

    assert code == 0
    assert len(out.splitlines()) == 1 + 2
    assert "could not read the poller's checkpoint" in err


async def test_passes_a_run_of_undecodable_entries_to_the_real_end(
    settings: Settings, wal: FakeWal
) -> None:
    first = wal.seed(1)
    # More than any bounded read would cover: the server skips them all and sends nothing.
    for _ in range(12_000):
        wal.append_value(b"\xff not a SpanDataContainer")
    wal.append(b"\xff\xff", b"")  # a span that does not decode
    last = wal.seed(1)

    code, out, err = await tail(settings, as_json=True)

    assert code == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == [
        first[0].hex(),
        last[0].hex(),
    ]
    assert err == ""


async def test_long_catch_up_shows_progress_on_stderr(settings: Settings, wal: FakeWal) -> None:
    hour_ago = int(time.time() * 1000) - 3_600_000
    keys = wal.seed(20, ms=hour_ago)

    code, out, err = await tail(settings)

    assert code == 0
    assert len(out.splitlines()) == 1 + len(keys)
    lines = err.splitlines()
    assert lines[0].startswith("catching up: 20 spans so far")
    assert lines[-1] == "caught up after 20 spans"


async def test_follow_prints_new_spans_until_interrupted(settings: Settings, wal: FakeWal) -> None:
    wal.seed(2)
    out, err = io.StringIO(), io.StringIO()
    following = asyncio.create_task(
        run_tail(settings, from_start=True, follow=True, as_json=True, out=out, err=err)
    )
    await wait_until(lambda: len(out.getvalue().splitlines()) == 2)

    later = wal.seed(3)
    await wait_until(lambda: len(out.getvalue().splitlines()) == 5)
    following.cancel()  # what asyncio.run does on Ctrl-C

    assert await following == 130
    assert json.loads(out.getvalue().splitlines()[-1])["key"] == later[-1].hex()


async def test_unreachable_service_is_an_error_exit(
    make_settings: Callable[..., Settings], free_port: int
) -> None:
    address = f"127.0.0.1:{free_port}"
    settings = make_settings(ingestion_grpc_address=address)
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    code = await run_tail(
        settings, from_start=True, follow=False, as_json=False, out=out, err=err, timeout=1.5
    )

    assert code == 1
    assert out.getvalue() == ""
    lines = err.getvalue().splitlines()
    # It says at once what it waits for, then gives up after --timeout with one error line.
    assert lines[0] == f"waiting for the ingestion-service at {address}"
    assert lines[1].startswith(f"error: INGESTION_GRPC_ADDRESS: nothing answered at {address}")
    assert time.monotonic() - started < 30  # a hang guard; --timeout was 1.5 s


async def test_follow_waits_through_an_outage_with_one_line_each_way(
    make_settings: Callable[..., Settings], ingestion_service: FakeIngestionService, wal: FakeWal
) -> None:
    server = FakeIngestionServer(ingestion_service)
    await server.start()
    address = server.address
    await server.stop()  # nothing answers there yet
    settings = make_settings(ingestion_grpc_address=address)
    out, err = io.StringIO(), io.StringIO()
    following = asyncio.create_task(
        run_tail(settings, from_start=True, follow=True, as_json=True, out=out, err=err, timeout=1)
    )
    try:
        await wait_until(lambda: "waiting for the ingestion-service" in err.getvalue())
        wal.seed(2)
        restarted = FakeIngestionServer(ingestion_service, port=int(address.rsplit(":", 1)[1]))
        await restarted.start()
        try:
            await wait_until(lambda: len(out.getvalue().splitlines()) == 2, limit=30)
        finally:
            await restarted.stop()
    finally:
        following.cancel()
        assert await following == 130
    lines = err.getvalue().splitlines()
    assert lines.count(f"waiting for the ingestion-service at {address}") == 1
    assert lines.count(f"connected to the ingestion-service at {address}") == 1


async def test_nothing_after_the_checkpoint_says_so(
    settings: Settings, wal: FakeWal, engine: AsyncEngine
) -> None:
    keys = wal.seed(2)
    async with engine.begin() as conn:
        await save_checkpoint(conn, keys[-1])

    code, out, err = await tail(settings, from_start=False)

    assert code == 0
    assert out == ""
    assert "no spans after the poller's checkpoint" in err
    assert "--from-start" in err


async def test_closed_output_pipe_ends_quietly(settings: Settings, wal: FakeWal) -> None:
    wal.seed(3)
    # A real pipe whose reader has gone, as after `spans tail | head -1`.
    reader, writer = os.pipe()
    os.close(reader)
    out = os.fdopen(writer, "w", encoding="utf-8")
    try:
        code = await run_tail(
            settings, from_start=True, follow=False, as_json=False, out=out, err=io.StringIO()
        )
    finally:
        with contextlib.suppress(BrokenPipeError):  # what is still buffered cannot go anywhere
            out.close()

    assert code == 0


async def test_the_cli_command_and_ctrl_c(
    ingestion_server: FakeIngestionServer, wal: FakeWal, database_url: str
) -> None:
    keys = wal.seed(4)
    env = os.environ | {
        "INGESTION_GRPC_ADDRESS": ingestion_server.address,
        "DATABASE_URL": database_url,
        "POLLER_IDLE_WAIT_SECONDS": "0.05",
    }
    cli = [sys.executable, "-m", "junjo_backend.cli.main", "spans", "tail"]

    finished = await asyncio.create_subprocess_exec(
        *cli, "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, _ = await asyncio.wait_for(finished.communicate(), timeout=60)
    finally:
        await _reap(finished)
    assert finished.returncode == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == [k.hex() for k in keys]

    # A child inherits an ignored SIGINT (pytest run as a background job without job
    # control), and Python then never turns Ctrl-C into an interrupt: spawn it with the
    # default disposition (a handler set here becomes SIG_DFL across exec).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        following = await asyncio.create_subprocess_exec(
            *cli,
            "--from-start",
            "--follow",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert following.stdout is not None
        for _ in keys:
            await asyncio.wait_for(following.stdout.readline(), timeout=60)
        following.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(following.communicate(), timeout=60)
    finally:
        await _reap(following)
    assert following.returncode == 130
    assert b"Traceback" not in err


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill `process` if a failure left it running, and wait for it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await process.wait()


def test_ulid_generator_is_monotonic_within_a_millisecond() -> None:
    ulids = UlidGenerator()
    first, second = ulids.new(1000), ulids.new(1000)
    assert first[:6] == second[:6]
    assert first < second
    assert ulids.new(999) > second  # the clock never goes back
