"""/health says what is true now, on every replica and through outages (issue 20, items 1-5).

Real app, real SQLite file, the in-process ingestion server (stopped, failing or stalled
with its switches: faults a test cannot otherwise cause on a real server).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from junjo_backend import __version__
from junjo_backend.poller.leadership import FileLockLeadership, lock_file_for

from .test_app_lifespan import running
from .test_observability import scrape, until, value

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import httpx

    from junjo_backend.settings import Settings
    from tests.ingestion.fake_ingestion import FakeIngestionServer, FakeWal

pytestmark = pytest.mark.timeout(120)


async def _health(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/health")
    body: dict[str, Any] = answer.json()
    return body


@contextlib.asynccontextmanager
async def _other_replica_leads(database_path: Path):  # type: ignore[no-untyped-def]
    """Hold the SQLite leader lock as another replica would: the backend under test stands by."""
    database_path.parent.mkdir(parents=True, exist_ok=True)
    holder = FileLockLeadership(None, lock_file_for(database_path))  # type: ignore[arg-type]
    assert await holder._take_lock()
    try:
        yield
    finally:
        await holder._drop_lock()


async def test_a_standby_follows_the_ingestion_service_both_ways(
    make_settings: Callable[..., Settings],
    ingestion: FakeIngestionServer,
    database_path: Path,
) -> None:
    await ingestion.stop()  # the replicas start before the ingestion-service
    settings = make_settings(ingestion_grpc_address=ingestion.address)
    async with _other_replica_leads(database_path), running(settings) as (http, backend):
        first = await _health(http)
        assert first["poller"]["role"] == "standby", first
        assert first["ingestion"]["reachable"] is False
        await ingestion.start()
        # Fresh evidence on a standby: its probe, never its start-up call.
        await until(lambda: backend.ingestion is not None and backend.ingestion.reachable, "up")
        up = await _health(http)
        await ingestion.stop()
        await until(
            lambda: backend.ingestion is not None and backend.ingestion.reachable is not True,
            "down",
        )
        down = await _health(http)
        _, samples = await scrape(http)
    assert up["ingestion"]["reachable"] is True
    assert up["status"] == "ok", up
    # A standby neither drains nor knows how far behind the leader is.
    assert up["poller"]["role_since"] is None
    assert up["poller"]["caught_up"] is None
    assert up["poller"]["backlog_age_seconds"] is None
    assert down["ingestion"]["reachable"] is False
    assert down["poller"]["last_error"].startswith("UNAVAILABLE")
    assert down["status"] == "degraded"
    assert value(samples, "junjo_ingestion_reachable") == 0
    assert math.isnan(value(samples, "junjo_poller_caught_up") or 0.0)
    assert value(samples, "junjo_poller_role_changed_timestamp_seconds") is None


async def test_an_error_answer_is_reachable_and_last_error_is_always_the_latest(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer, wal: FakeWal
) -> None:
    settings = make_settings(ingestion_grpc_address=ingestion.address)
    async with running(settings) as (http, backend):
        poller = backend.poller
        assert poller is not None
        await until(lambda: poller.status.caught_up, "caught up")
        await ingestion.stop()
        await until(lambda: poller.status.last_error is not None, "the outage is seen")
        outage = await _health(http)
        ingestion.service.fail_with = grpc.StatusCode.PERMISSION_DENIED
        await ingestion.start()
        await until(
            lambda: (poller.status.last_error or "").startswith("PERMISSION_DENIED"), "denied"
        )
        denied = await _health(http)
        ingestion.service.fail_with = grpc.StatusCode.UNIMPLEMENTED
        await until(lambda: (poller.status.last_error or "").startswith("UNIMPLEMENTED"), "next")
        unimplemented = await _health(http)
        ingestion.service.fail_with = None
        wal.seed(10)
        await until(lambda: poller.status.caught_up and poller.status.last_error is None, "back")
        back = await _health(http)
    assert outage["ingestion"]["reachable"] is False
    assert outage["poller"]["caught_up"] is None  # not known while it cannot be reached
    assert outage["poller"]["backlog_age_seconds"] > 0
    for answer, code in ((denied, "PERMISSION_DENIED"), (unimplemented, "UNIMPLEMENTED")):
        # It answered: reachable, and failing, which is neither caught up nor ok.
        assert answer["ingestion"]["reachable"] is True, answer
        assert answer["poller"]["last_error"].startswith(code), answer
        assert answer["poller"]["caught_up"] is None
        assert answer["status"] == "degraded"
    assert back["status"] == "ok"
    assert back["poller"]["caught_up"] is True
    assert back["poller"]["backlog_age_seconds"] == 0


async def test_caught_up_turns_false_and_the_backlog_age_grows_while_a_read_lags(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer, wal: FakeWal
) -> None:
    settle = 0.2
    settings = make_settings(
        ingestion_grpc_address=ingestion.address,
        poller_settle_seconds=settle,
        # A long stream, not a dead server: the stalled read is not cut by its deadline.
        ingestion_call_timeout_seconds=60,
        # The drain's timing is under test: the count-only sink (the store's start-up,
        # worker processes included, moves where the settle horizon starts).
        span_store="none",
    )
    async with running(settings) as (http, backend):
        poller = backend.poller
        assert poller is not None
        await until(lambda: poller.status.caught_up, "caught up")
        # The next read stops after 5 of these and waits: the poller is behind, reading.
        ingestion.service.pause_after = 5
        wal.seed(50, ms=int(time.time() * 1000) - 2000)
        await ingestion.service.paused.wait()
        await until(lambda: poller.status.caught_up is False, "behind")
        behind = await _health(http)
        _, samples = await scrape(http)
        await until(
            lambda: (
                (poller.status.backlog_age_seconds or 0) > behind["poller"]["backlog_age_seconds"]
            ),
            "the backlog age grows",
        )
        await ingestion.restart()
        await until(lambda: poller.status.caught_up is True, "caught up again")
        again = await _health(http)
    assert behind["poller"]["backlog_age_seconds"] > settle
    assert behind["ingestion"]["reachable"] is True  # the stalled stream is no outage
    assert value(samples, "junjo_poller_caught_up") == 0
    assert again["poller"]["backlog_age_seconds"] == 0
    assert again["poller"]["spans_processed"] == len(wal.keys)


async def test_health_answers_head_and_carries_version_and_uptime(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer
) -> None:
    settings = make_settings(ingestion_grpc_address=ingestion.address)
    async with running(settings) as (http, _backend):
        head = await http.head("/health")
        first = await _health(http)
        await asyncio.sleep(0.05)
        second = await _health(http)
    assert head.status_code == 200
    assert head.headers["content-type"] == "application/json"
    assert first["version"] == __version__
    assert 0 <= first["uptime_seconds"] < second["uptime_seconds"]
