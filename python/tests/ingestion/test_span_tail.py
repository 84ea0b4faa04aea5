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

from sqlalchemy.engine import make_url

from junjo_backend.poller import load_checkpoint, save_checkpoint
from junjo_backend.span_tail import run_tail

from .fake_ingestion import FakeWal, UlidGenerator, make_resource, make_span, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.settings import Settings

    from .fake_ingestion import FakeIngestionServer

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


async def tail(settings: Settings, **options: bool) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    arguments = {"from_start": True, "follow": False, "as_json": False} | options
    code = await run_tail(settings, **arguments, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_text_lines(settings: Settings, wal: FakeWal) -> None:
    seed_known_span(wal)
    wal.seed(2)

    code, out, err = await tail(settings)

    assert code == 0
    assert err == ""
    first, *rest = out.splitlines()
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

    code, out, _ = await tail(settings, from_start=False)

    assert code == 0
    assert len(out.splitlines()) == 3
    database = make_url(settings.database_url).database
    assert database is not None
    assert not await asyncio.to_thread(Path(database).exists)


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

    code, out, _ = await tail(settings, from_start=False)

    assert code == 0
    assert len(out.splitlines()) == 2


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
    assert len(out.splitlines()) == len(keys)
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
    settings = make_settings(
        ingestion_grpc_address=f"127.0.0.1:{free_port}", ingestion_retry_deadline_seconds=0.2
    )

    code, out, err = await tail(settings)

    assert code == 1
    assert out == ""
    assert err.startswith("spans tail: UNAVAILABLE")


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
    cli = [sys.executable, "-m", "junjo_backend.cli", "spans", "tail"]

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
