"""ValidateApiKey through a real channel to a running AuthServer on a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_reflection.v1alpha import (  # type: ignore[import-untyped]
    reflection_pb2,
    reflection_pb2_grpc,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url

from harness.waiting import wait_until
from junjo_backend.auth.key_store import create_api_key, revoke_api_key
from junjo_backend.auth.server import (
    MAX_KEY_BYTES,
    READINESS_PROBE_KEY,
    SERVICE_NAME,
    VALIDATE_METHOD,
    AuthServer,
)
from junjo_backend.database import close_engine, create_engine, init_schema
from tests.settings_factory import backend_settings

from .auth_calls import (
    MISS_FLOOR_PASSED,
    NOT_SERVING,
    SERVING,
    KeyRegistry,
    auth_stub,
    health,
    validate,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend._wire.ingestion import auth_pb2_grpc
    from junjo_backend.auth.key_store import NewApiKey
    from junjo_backend.settings import Settings

    from .conftest import RecordingHandler, RunningAuth

    Stub = auth_pb2_grpc.InternalAuthServiceAsyncStub
    MakeKey = Callable[..., Awaitable[NewApiKey]]


async def test_a_stored_key_is_valid(stub: Stub, make_key: MakeKey) -> None:
    key = await make_key()
    assert await validate(stub, key.key) is True


async def test_an_unknown_key_is_invalid(stub: Stub, used_keys: KeyRegistry) -> None:
    assert await validate(stub, used_keys.unknown()) is False


async def test_a_key_created_after_start_validates_once_the_miss_floor_passed(
    auth_server: AuthServer, engine: AsyncEngine, stub: Stub, used_keys: KeyRegistry
) -> None:
    key = used_keys.add((await create_api_key(engine, "new app")).key)
    # A miss refreshes the snapshot when it is older than the floor, so after the floor
    # the key is found however recently the last read happened.
    await asyncio.sleep(MISS_FLOOR_PASSED)
    assert await validate(stub, key) is True
    assert auth_server.known_keys.size == 1


async def test_a_revoked_key_is_refused_once_the_max_age_passed(
    settings: Settings, engine: AsyncEngine, stub: Stub, make_key: MakeKey
) -> None:
    key = await make_key()
    keep = await make_key("another app")
    assert await validate(stub, key.key) is True
    assert await revoke_api_key(engine, key.id) is True
    # Every answer comes from a snapshot read at most max_age ago, so once max_age has
    # passed since the commit, no snapshot that still holds the key may answer.
    await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
    assert await validate(stub, key.key) is False
    assert await validate(stub, keep.key) is True


async def test_an_empty_key_is_invalid_without_a_database_read(
    auth_server: AuthServer, stub: Stub
) -> None:
    reads = auth_server.known_keys.reads
    assert await validate(stub, "") is False
    assert auth_server.known_keys.reads == reads


@pytest.mark.parametrize("size", [MAX_KEY_BYTES + 1, 10_000, 1_000_000])
async def test_an_oversized_key_is_invalid_without_a_database_read(
    auth_server: AuthServer, stub: Stub, size: int
) -> None:
    reads = auth_server.known_keys.reads
    assert await validate(stub, "k" * size) is False
    assert await validate(stub, "é" * (MAX_KEY_BYTES // 2 + 1)) is False  # 258 bytes
    assert auth_server.known_keys.reads == reads


async def test_a_stored_key_at_the_size_limit_is_still_looked_up(
    engine: AsyncEngine, stub: Stub, used_keys: KeyRegistry
) -> None:
    # A hand-inserted key of exactly MAX_KEY_BYTES is a key like any other.
    key = used_keys.add("a" * MAX_KEY_BYTES)
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO api_keys (id, key, name) VALUES ('long', :key, 'long')"),
            {"key": key},
        )
    await asyncio.sleep(MISS_FLOOR_PASSED)
    assert await validate(stub, key) is True


async def test_the_readiness_probe_gets_a_prompt_false_on_an_empty_database(
    auth_server: AuthServer, stub: Stub
) -> None:
    assert auth_server.known_keys.size == 0
    assert await validate(stub, READINESS_PROBE_KEY) is False


async def test_non_utf8_bytes_fail_the_call_and_the_server_keeps_serving(
    channel: grpc.aio.Channel, stub: Stub, make_key: MakeKey
) -> None:
    key = await make_key()
    # Field 1 (api_key), length 2, two bytes that are not UTF-8: no Python client would
    # build this message, so the bytes go through a method with no serializer.
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(VALIDATE_METHOD)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await raw(b"\x0a\x02\xff\xfe", timeout=5)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as garbage:
        await raw(b"\xff\xff\xff", timeout=5)  # not even a protobuf message
    assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert await validate(stub, key.key) is True


async def test_a_refused_call_leaves_no_cycle_holding_the_call_or_the_server(
    auth_server: AuthServer, channel: grpc.aio.Channel
) -> None:
    # An abort's exception, kept by grpc on the call's state, held our frames and through
    # them the call's context: a cycle per refused call that kept the call state and the
    # server alive past stop() and past their event loop, until the cyclic GC ran. With
    # the collector off, whatever is left after the calls and the stop is such a cycle.
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(VALIDATE_METHOD)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await raw(b"\x0a\x02\xff\xfe", timeout=5)
            assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        del failure
        await auth_server.stop(0)
        left = [type(o).__name__ for o in gc.get_objects() if _is_server_call_state(o)]
    finally:
        gc.enable()
    assert left == []


def _is_server_call_state(thing: object) -> bool:
    kind = type(thing)
    return kind.__module__ == "grpc._cython.cygrpc" and kind.__name__ in {
        "RPCState",
        "_ServicerContext",
    }


async def test_two_hundred_concurrent_calls_mixing_valid_and_invalid_keys(
    stub: Stub, make_key: MakeKey, used_keys: KeyRegistry
) -> None:
    valid = [(await make_key(f"app {i}")).key for i in range(10)]
    calls = [(random.choice(valid), True) for _ in range(100)]  # noqa: S311 (a test mix)
    calls += [(used_keys.unknown(), False) for _ in range(90)]
    calls += [("", False), (READINESS_PROBE_KEY, False), ("x" * 1000, False)] * 3 + [
        (valid[0], True)
    ]
    random.shuffle(calls)
    assert len(calls) == 200
    answers = await asyncio.gather(*(validate(stub, key) for key, _ in calls))
    assert answers == [expected for _, expected in calls]


async def test_health_is_serving_for_the_server_and_the_auth_service(
    channel: grpc.aio.Channel, auth_server: AuthServer
) -> None:
    assert auth_server.database_ok is True
    assert await health(channel) == SERVING
    assert await health(channel, SERVICE_NAME) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health(channel, "no.such.Service")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reflection_is_off_by_default(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in stub.ServerReflectionInfo(iter([request]), timeout=5):
            pass
    assert failure.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_lists_the_services_when_enabled(
    settings: Settings, engine: AsyncEngine
) -> None:
    server = AuthServer(settings.model_copy(update={"grpc_reflection_enabled": True}), engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
    finally:
        await server.stop(0)
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_a_missing_table_gives_internal_never_true_then_recovers(
    running: RunningAuth, used_keys: KeyRegistry
) -> None:
    settings, engine, auth_server = running.settings, running.engine, running.server
    channel, stub, make_key = running.channel, running.stub, running.make_key
    key = await make_key()
    assert await validate(stub, key.key) is True
    # A real fault, through another connection: the table the server reads disappears.
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_away"))
    await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
    for probe in (key.key, used_keys.unknown()):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await validate(stub, probe)
        assert failure.value.code() is grpc.StatusCode.INTERNAL
        assert key.key not in (failure.value.details() or "")
    assert not auth_server.database_ok

    async def not_serving() -> bool:
        return await health(channel) == NOT_SERVING

    await wait_until(not_serving, "health goes NOT_SERVING")
    assert await health(channel, SERVICE_NAME) == NOT_SERVING
    # Keys that need no lookup are still answered.
    assert await validate(stub, READINESS_PROBE_KEY) is False

    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE api_keys_away RENAME TO api_keys"))

    async def serving() -> bool:
        return await health(channel) == SERVING

    await wait_until(serving, "health comes back to SERVING")
    assert await validate(stub, key.key) is True


def _replace_with_garbage(path: Path) -> None:
    # A new file at the path. A rollback journal is there only while a write is under way;
    # one left behind would be rolled back into the garbage, so it goes too.
    for suffix in ("", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not an SQLite database " * 200)


def _restore(saved: Path, path: Path) -> None:
    path.unlink()
    shutil.copy(saved, path)


async def test_a_database_file_that_is_not_a_database_gives_internal_then_recovers(
    running: RunningAuth, tmp_path: Path
) -> None:
    settings, engine, auth_server = running.settings, running.engine, running.server
    channel, stub, make_key = running.channel, running.stub, running.make_key
    key = await make_key()
    assert await validate(stub, key.key) is True
    database = make_url(settings.database_url).database
    assert database is not None
    path = Path(database)
    # Rollback-journal mode (journal_mode=DELETE): between writes the file alone holds every
    # committed key, so a copy of it is a whole backup.
    saved = tmp_path / "saved.db"
    shutil.copy(path, saved)
    # The file is replaced by garbage, and the pool is emptied so that new connections
    # open the garbage (open connections would keep reading the old, deleted file).
    _replace_with_garbage(path)
    await engine.dispose()
    await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await validate(stub, key.key)
    assert failure.value.code() is grpc.StatusCode.INTERNAL

    _restore(saved, path)

    async def recovered() -> bool:
        return auth_server.database_ok and await health(channel) == SERVING

    await wait_until(recovered, "the server reads the restored file")
    assert await validate(stub, key.key) is True


async def test_a_server_started_on_a_broken_database_serves_internal_until_it_is_fixed(
    settings: Settings, used_keys: KeyRegistry
) -> None:
    engine = create_engine(settings.database_url)  # no schema yet: no api_keys table
    server = AuthServer(settings, engine)
    await server.start()
    try:
        assert server.running is True
        assert server.database_ok is False
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_stub(channel)
            assert await health(channel) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await validate(stub, used_keys.unknown())
            assert failure.value.code() is grpc.StatusCode.INTERNAL
            await init_schema(engine)

            async def serving() -> bool:
                return await health(channel) == SERVING

            await wait_until(serving, "health goes SERVING once the table exists")
            assert await validate(stub, used_keys.unknown()) is False
    finally:
        await server.stop(0)
        await close_engine(engine)


_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA busy_timeout=30000")
for i in range(int(sys.argv[2])):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO api_keys (id, key, name) VALUES (?, ?, 'writer')",
               (f"w{i}", f"writer-key-{i:04d}-" + "w" * 40))
    time.sleep(0.02)  # hold the write lock while the server reads
    db.execute("COMMIT")
print("done", flush=True)
"""


async def test_writers_in_other_processes_never_turn_into_wrong_answers(
    settings: Settings, stub: Stub, make_key: MakeKey, used_keys: KeyRegistry, console_script: str
) -> None:
    valid = [(await make_key(f"app {i}")).key for i in range(5)]
    path = make_url(settings.database_url).database
    assert path is not None
    env = {**os.environ, "DATABASE_URL": settings.database_url}
    # Another process holds the write lock again and again, and the real CLI creates keys.
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, path, "40", stdout=asyncio.subprocess.PIPE
    )
    cli = [
        await asyncio.create_subprocess_exec(
            console_script,
            "api-keys",
            "create",
            f"cli {i}",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(3)
    ]
    finished = asyncio.ensure_future(
        asyncio.gather(writer.communicate(), *(proc.communicate() for proc in cli))
    )
    wrong: list[tuple[str, bool]] = []
    rounds = 0
    try:
        while not finished.done() or rounds < 5:
            rounds += 1
            batch = [(k, True) for k in valid] + [(used_keys.unknown(), False) for _ in range(5)]
            answers = await asyncio.gather(*(validate(stub, k) for k, _ in batch))
            answered = zip(batch, answers, strict=True)
            wrong += [(k, want) for (k, want), got in answered if got != want]
        (_, _), *outputs = await finished
    finally:
        # A call that failed above must not leave the writer and the CLI processes behind.
        for proc in (writer, *cli):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(finished, return_exceptions=True)
    assert wrong == []
    assert writer.returncode == 0
    for proc, (out, err) in zip(cli, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        created = [line.strip() for line in out.decode().splitlines() if len(line.strip()) == 64]
        assert len(created) == 1
        used_keys.add(created[0])
        assert not used_keys.found_in(err.decode())
        await asyncio.sleep(MISS_FLOOR_PASSED)
        assert await validate(stub, created[0]) is True
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        assert db.execute("SELECT count(*) FROM api_keys").fetchone() == (5 + 40 + 3,)


async def test_start_twice_is_refused_and_stop_is_idempotent(
    settings: Settings, engine: AsyncEngine
) -> None:
    server = AuthServer(settings, engine)
    states = [server.running]
    await server.stop()  # never started: nothing to do
    await server.start()
    try:
        states.append(server.running)
        assert states == [False, True]
        assert server.port > 0
        assert server.address == f"127.0.0.1:{server.port}"
        with pytest.raises(RuntimeError):
            await server.start()
        await asyncio.gather(server.stop(), server.stop(0.5))
        await server.stop()
        assert server.running is False
    finally:
        await server.stop(0)  # a failure above must not leave it serving
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await validate(auth_stub(channel), "any")
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_port_in_use_makes_start_fail(
    settings: Settings, engine: AsyncEngine, auth_server: AuthServer
) -> None:
    taken = settings.model_copy(update={"auth_grpc_listen_address": auth_server.address})
    second = AuthServer(taken, engine)
    with pytest.raises(OSError, match="cannot listen"):
        await second.start()
    assert second.running is False


def test_an_address_without_a_port_is_refused(settings: Settings) -> None:
    bad = settings.model_copy(update={"auth_grpc_listen_address": "localhost"})
    with pytest.raises(ValueError, match="host:port"):
        AuthServer(bad, engine=None)  # type: ignore[arg-type]


async def test_calls_under_way_finish_within_the_grace_period(
    postgres_url: str, used_keys: KeyRegistry
) -> None:
    # A call is held inside the servicer by a real condition: a migration-like transaction
    # holds ACCESS EXCLUSIVE on api_keys (what ALTER TABLE takes), so the read that a miss
    # triggers waits in PostgreSQL. SQLite cannot hold it so: in its rollback-journal mode a
    # writer's exclusive lock does block the read, but only for the busy timeout, after
    # which the read fails instead of completing; nor can another connection see it waiting.
    settings = backend_settings(postgres_url)
    engine = create_engine(postgres_url)
    await init_schema(engine)
    server = AuthServer(settings, engine)
    try:
        await server.start()
        # Created after start, so the snapshot lacks it: the call must read the table.
        key = used_keys.add((await create_api_key(engine, "held call")).key)
        await asyncio.sleep(MISS_FLOOR_PASSED)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_stub(channel)
            async with engine.connect() as migration, engine.connect() as observer:
                await migration.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
                call = asyncio.create_task(validate(stub, key))

                async def read_waits_on_the_lock() -> bool:
                    waiting = await observer.execute(_WAITING_ON_API_KEYS)
                    await observer.rollback()  # each look in a fresh snapshot
                    return bool(waiting.scalar_one())

                await wait_until(read_waits_on_the_lock, "the key read waiting on the lock")
                stopping = asyncio.create_task(server.stop(30.0))  # 30 s: a hang guard
                await wait_until(
                    lambda: _refuses_connections(server.port), "the server to stop listening"
                )
                # The server is shutting down and the call is still in the servicer.
                assert not call.done()
                assert not stopping.done()
                await migration.rollback()  # the lock goes; the read completes
            assert await call is True
            await stopping
    finally:
        await server.stop(0)
        await close_engine(engine)


# A lock request on api_keys that PostgreSQL has not granted: a query waiting on the lock.
_WAITING_ON_API_KEYS = text(
    "SELECT count(*) FROM pg_locks WHERE relation = 'api_keys'::regclass AND NOT granted"
)


async def _refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_the_call_log_names_method_and_code_but_never_the_key(
    stub: Stub, make_key: MakeKey, caplog: pytest.LogCaptureFixture
) -> None:
    key = await make_key()
    caplog.set_level("DEBUG", logger="junjo_backend.auth.server")
    assert await validate(stub, key.key) is True
    calls = [r for r in caplog.records if r.getMessage() == "grpc call"]
    assert calls
    record = calls[-1]
    assert record.__dict__["grpc_method"] == VALIDATE_METHOD
    assert record.__dict__["grpc_code"] == "OK"
    assert record.__dict__["duration_ms"] >= 0
    assert all(key.key not in str(r.__dict__) for r in caplog.records)


async def test_failed_calls_are_logged_at_a_bounded_rate_and_all_accounted_for(
    settings: Settings,
    engine: AsyncEngine,
    stub: Stub,
    used_keys: KeyRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_away"))
    await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
    caplog.set_level("WARNING", logger="junjo_backend.auth.server")

    async def fails() -> bool:
        try:
            await validate(stub, used_keys.unknown())
        except grpc.aio.AioRpcError as failure:
            return failure.code() is grpc.StatusCode.INTERNAL
        return False

    assert all(await asyncio.gather(*(fails() for _ in range(60))))
    # The next second's first failure reports how many the last second left out.
    await asyncio.sleep(1.05)
    assert await fails()
    lines = [r for r in caplog.records if r.getMessage() == "grpc call"]
    assert all(r.__dict__["grpc_code"] == "INTERNAL" for r in lines)
    assert len(lines) < 61
    assert len(lines) + sum(r.__dict__.get("calls_not_logged", 0) for r in lines) == 61


async def test_the_session_log_watch_sees_every_debug_call_line(
    stub: Stub, used_keys: KeyRegistry, session_log: RecordingHandler
) -> None:
    # The leak check at the end of the session is only as good as what it sees.
    before = len(session_log.lines)
    key = used_keys.unknown()
    assert await validate(stub, key) is False
    new = session_log.lines[before:]
    assert any('"grpc call"' in line and '"grpc_code": "OK"' in line for line in new)
    assert not any(key in line for line in new)
    # The check also catches a key's first or last characters, not only the whole key.
    assert used_keys.found_in(f"key hint {key[:8]}...")
    assert used_keys.found_in(f"key ending ...{key[-8:]}")
