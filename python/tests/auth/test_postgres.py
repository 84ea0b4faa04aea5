"""The key store and the server on PostgreSQL (asyncpg), chosen by the URL alone."""

from __future__ import annotations

import argparse
import asyncio
import io
from typing import TYPE_CHECKING

import grpc
import pytest

from harness.waiting import wait_until
from junjo_backend.auth.key_store import (
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from junjo_backend.auth.server import AuthServer
from junjo_backend.cli.console import Console
from junjo_backend.cli.key_commands import run_api_keys_command
from junjo_backend.database import close_engine, create_engine, init_schema
from tests.settings_factory import backend_settings

from .auth_calls import NOT_SERVING, SERVING, auth_stub, health, validate

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.postgres_cluster import PostgresCluster

    from .auth_calls import KeyRegistry


async def _fresh_engine(postgres_url: str) -> AsyncEngine:
    engine = create_engine(postgres_url)
    await init_schema(engine)
    return engine


async def test_keys_validate_and_revoke_on_postgresql(
    postgres_url: str, used_keys: KeyRegistry
) -> None:
    settings = backend_settings(postgres_url)
    engine = await _fresh_engine(postgres_url)
    try:
        before = await create_api_key(engine, "before start")
        used_keys.add(before.key)
        listed = await list_api_keys(engine)
        assert [k.id for k in listed] == [before.id]
        assert listed[0].created_at.tzinfo is not None
        server = AuthServer(settings, engine)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = auth_stub(channel)
                assert await health(channel) == SERVING
                assert await validate(stub, before.key) is True
                assert await validate(stub, used_keys.unknown()) is False
                assert await revoke_api_key(engine, before.id) is True
                await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
                assert await validate(stub, before.key) is False
        finally:
            await server.stop(0)
    finally:
        await close_engine(engine)


async def test_a_postgresql_outage_gives_internal_and_the_server_recovers(
    postgres: PostgresCluster, postgres_url: str, used_keys: KeyRegistry
) -> None:
    # Stops the session's cluster and starts it again on the same port and data folder, so
    # the tests after it find it as it was.
    settings = backend_settings(postgres_url)
    engine = await _fresh_engine(postgres_url)
    key = await create_api_key(engine, "outage")
    used_keys.add(key.key)
    server = AuthServer(settings, engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = auth_stub(channel)
            assert await validate(stub, key.key) is True
            await asyncio.to_thread(postgres.stop)
            try:
                await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
                for probe in (key.key, used_keys.unknown()):
                    with pytest.raises(grpc.aio.AioRpcError) as failure:
                        await validate(stub, probe)
                    assert failure.value.code() is grpc.StatusCode.INTERNAL

                async def not_serving() -> bool:
                    return await health(channel) == NOT_SERVING

                await wait_until(not_serving, "health goes NOT_SERVING")
            finally:
                await asyncio.to_thread(postgres.start)

            async def serving() -> bool:
                return await health(channel) == SERVING

            await wait_until(serving, "health comes back once PostgreSQL is up")
            assert await validate(stub, key.key) is True
    finally:
        await server.stop(0)
        await close_engine(engine)


async def test_the_api_keys_command_works_on_postgresql(
    postgres_url: str, used_keys: KeyRegistry
) -> None:
    settings = backend_settings(postgres_url)
    await close_engine(await _fresh_engine(postgres_url))
    out = io.StringIO()
    create = argparse.Namespace(api_keys_command="create", name="pg cli", json=False)
    assert await run_api_keys_command(settings, create, Console(out, io.StringIO())) == 0
    key = out.getvalue().strip()
    used_keys.add(key)
    listing = io.StringIO()
    list_args = argparse.Namespace(api_keys_command="list", json=False)
    assert await run_api_keys_command(settings, list_args, Console(listing, io.StringIO())) == 0
    assert "pg cli" in listing.getvalue()
    assert key not in listing.getvalue()
