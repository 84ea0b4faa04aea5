"""KnownKeys, the snapshot the server answers from, against a real SQLite file."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from junjo_backend.auth.known_keys import KeyStoreUnavailable, KnownKeys

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.auth.key_store import NewApiKey

    from .auth_calls import KeyRegistry

    MakeKey = Callable[..., Awaitable[NewApiKey]]

FLOOR = 0.05


async def _hide_table(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_away"))


def test_the_refresh_floor_must_fit_in_the_max_age(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="miss_refresh_after"):
        KnownKeys(engine, max_age=0.1, miss_refresh_after=0.2)
    with pytest.raises(ValueError, match="miss_refresh_after"):
        KnownKeys(engine, max_age=0.1, miss_refresh_after=0)


async def test_concurrent_first_lookups_share_one_read(
    engine: AsyncEngine, make_key: MakeKey, used_keys: KeyRegistry
) -> None:
    key = await make_key()
    keys = KnownKeys(engine, max_age=0.5)
    availability = [keys.available]
    assert keys.age() == float("inf")
    answers = await asyncio.gather(
        *(keys.contains(key.key) for _ in range(50)),
        *(keys.contains(used_keys.unknown()) for _ in range(50)),
    )
    assert answers == [True] * 50 + [False] * 50
    assert keys.reads == 1
    availability.append(keys.available)
    assert availability == [None, True]
    assert keys.size == 1


async def test_a_flood_of_unknown_keys_costs_at_most_one_read_per_floor(
    engine: AsyncEngine, make_key: MakeKey, used_keys: KeyRegistry
) -> None:
    await make_key()
    keys = KnownKeys(engine, max_age=1.0, miss_refresh_after=FLOOR)
    await keys.refresh()
    started, reads = time.monotonic(), keys.reads
    flood = [used_keys.unknown() for _ in range(200)]
    for _ in range(10):
        answers = await asyncio.gather(*(keys.contains(k) for k in flood))
        assert not any(answers)
    elapsed = time.monotonic() - started
    # A count, not a duration: reads are bounded by how many floors fit in the flood.
    assert keys.reads - reads <= elapsed / FLOOR + 2


async def test_a_failed_read_is_not_retried_within_the_floor(
    engine: AsyncEngine, make_key: MakeKey
) -> None:
    key = await make_key()
    keys = KnownKeys(engine, max_age=FLOOR, miss_refresh_after=FLOOR)
    await keys.refresh()
    await _hide_table(engine)
    await asyncio.sleep(FLOOR * 1.2)
    started, reads = time.monotonic(), keys.reads
    for _ in range(100):
        with pytest.raises(KeyStoreUnavailable):
            await keys.contains(key.key)
    elapsed = time.monotonic() - started
    assert keys.available is False
    assert keys.failures >= 1
    assert keys.reads - reads <= elapsed / FLOOR + 2


async def test_a_failed_read_ends_every_answer_from_the_old_snapshot(
    engine: AsyncEngine, make_key: MakeKey, used_keys: KeyRegistry
) -> None:
    key = await make_key()
    keys = KnownKeys(engine, max_age=60, miss_refresh_after=FLOOR)
    await keys.refresh()
    assert await keys.contains(key.key) is True
    await _hide_table(engine)
    await asyncio.sleep(FLOOR * 1.2)
    # The refresh a miss triggers fails: from then on nothing is answered from the old
    # snapshot, although it is far younger than the max age; no stale "yes", no guessed "no".
    with pytest.raises(KeyStoreUnavailable):
        await keys.contains(used_keys.unknown())
    assert keys.available is False
    assert keys.size == 0
    with pytest.raises(KeyStoreUnavailable):
        await keys.contains(key.key)


async def test_a_read_that_outlives_its_timeout_counts_as_failed(engine: AsyncEngine) -> None:
    keys = KnownKeys(engine, max_age=0.5, read_timeout=1e-9)
    assert await keys.refresh() is False
    assert keys.available is False
    with pytest.raises(KeyStoreUnavailable):
        await keys.contains("any")


async def test_close_cancels_a_read_under_way_and_later_reads_still_work(
    engine: AsyncEngine, make_key: MakeKey
) -> None:
    key = await make_key()
    keys = KnownKeys(engine, max_age=0.5)
    waiting = asyncio.ensure_future(keys.refresh())
    await asyncio.sleep(0)  # the read has started
    await keys.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await keys.close()  # nothing under way: nothing to do
    assert await keys.contains(key.key) is True
