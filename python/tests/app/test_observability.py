"""/metrics and /health through the real app: real ports, real SQLite, the fake ingestion server."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from junjo_backend import __version__
from junjo_backend.auth.key_store import create_api_key
from junjo_backend.ingestion.spans import ulid_millis
from tests.auth.auth_calls import KeyRegistry
from tests.ingestion.fake_ingestion import FakeIngestionServer, FakeIngestionService, FakeWal

from .backend_under_test import drop_table
from .test_app_lifespan import running, validate

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import httpx

    from junjo_backend.settings import Settings

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient) -> tuple[str, Samples]:
    """/metrics as text and as samples keyed by name and labels."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until(condition: Callable[[], object], what: str) -> None:
    """Poll until `condition` holds; fail after 60 s (a hang guard, not a timing)."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def test_metrics_move_as_calls_are_made_and_carry_no_key_material(
    make_settings: Callable[..., Settings],
    wal: FakeWal,
    ingestion: FakeIngestionServer,
    database_path: Path,
) -> None:
    keys = KeyRegistry()
    settings = make_settings(ingestion_grpc_address=ingestion.address)
    async with running(settings) as (http, backend):
        _, before = await scrape(http)
        key = keys.add((await create_api_key(backend.engine, "metrics app")).key)
        await asyncio.sleep(0.1)  # past the snapshot's miss floor: the new key is found
        address = backend.auth_server.address
        assert await validate(address, key) is True
        for _ in range(2):
            assert await validate(address, keys.unknown()) is False
        await until(
            lambda: (
                backend.poller is not None
                and backend.poller.status.caught_up
                and backend.poller.status.spans_processed == len(wal.keys)
            ),
            "drained",
        )
        text, after = await scrape(http)

        # An error answer through a broken database: its api_keys table is gone.
        drop_table(database_path, "api_keys")
        await asyncio.sleep(settings.api_key_cache_max_age_seconds * 1.2)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await validate(address, key)
        assert failure.value.code() is grpc.StatusCode.INTERNAL
        broken_text, broken = await scrape(http)

    calls = "junjo_auth_validate_calls_total"
    assert [value(before, calls, outcome=o) for o in ("valid", "invalid", "error")] == [0, 0, 0]
    assert value(after, calls, outcome="valid") == 1
    assert value(after, calls, outcome="invalid") == 2
    assert value(broken, calls, outcome="error") == 1
    assert value(after, "junjo_auth_validate_duration_seconds_count", outcome="valid") == 1
    assert any(
        name == "junjo_build_info" and ("version", __version__) in labels for name, labels in after
    )
    # prometheus-client's `*_created` series are turned off (they are undocumented noise).
    assert not [name for name, _ in after if name.endswith("_created")]
    assert "_created" not in text
    assert value(after, "junjo_api_keys_snapshot_keys") == 1
    assert (value(after, "process_resident_memory_bytes") or 0) > 0
    assert (value(after, "junjo_api_keys_snapshot_age_seconds") or 0) < 60
    assert value(after, "junjo_api_keys_read_failures_total") == 0
    assert (value(broken, "junjo_api_keys_read_failures_total") or 0) >= 1
    assert value(broken, "junjo_api_keys_snapshot_age_seconds") == float("inf")

    assert value(after, "junjo_poller_spans_processed_total") == len(wal.keys)
    # 250 in batches of 1000: one, or two where the settle window cut the seeded run.
    assert value(after, "junjo_poller_batches_committed_total") in {1, 2}
    assert value(after, "junjo_poller_entries_skipped_total") == 0
    assert value(after, "junjo_poller_caught_up") == 1
    assert value(after, "junjo_poller_leader") == 1  # the only replica leads
    assert (value(after, "junjo_poller_role_changed_timestamp_seconds") or 0) > 0
    assert value(after, "junjo_poller_backlog_age_seconds") == 0
    assert value(after, "junjo_poller_checkpoint_timestamp_seconds") == (
        ulid_millis(wal.keys[-1]) / 1000
    )
    assert value(after, "junjo_ingestion_reachable") == 1
    assert value(after, "junjo_ingestion_reconnects_total") == 0

    for scraped in (text, broken_text):
        assert not keys.found_in(scraped)
    # No label can carry a key: every label is one of these, with values from fixed sets.
    labels = {name for _, pairs in [*after, *broken] for name, _ in pairs}
    assert labels <= {"outcome", "code", "le", "version", "python_version"}


async def test_with_the_poller_disabled_health_is_ok_and_nothing_dials_the_ingestion_service(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer
) -> None:
    settings = make_settings(ingestion_grpc_address=ingestion.address, poller_enabled=False)
    async with running(settings) as (http, backend):
        answers = [await http.get("/health") for _ in range(5)]
        _, samples = await scrape(http)
        assert backend.ingestion is None

    assert ingestion.service.requests == []
    for answer in answers:
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "ok"
        assert body["ingestion"]["reachable"] is None
        assert body["poller"]["enabled"] is False
    assert not [name for name, _ in samples if name.startswith(("junjo_poller", "junjo_ingestion"))]
    assert value(samples, "junjo_api_keys_snapshot_keys") == 0


async def test_health_and_metrics_make_no_readspans_call_and_change_nothing(
    make_settings: Callable[..., Settings], ingestion: FakeIngestionServer
) -> None:
    # Once caught up the poller waits 30 s before its next read: any call in between would
    # be /health's or /metrics's own.
    settings = make_settings(ingestion_grpc_address=ingestion.address, poller_idle_wait_seconds=30)
    async with running(settings) as (http, backend):
        await until(
            lambda: backend.poller is not None and backend.poller.status.caught_up, "caught up"
        )
        requests = len(ingestion.service.requests)
        first = (await http.get("/health")).json()
        for _ in range(20):
            await http.get("/health")
            await http.get("/metrics")
        last = (await http.get("/health")).json()
        assert len(ingestion.service.requests) == requests

    assert first["status"] == last["status"] == "ok"
    assert first["ingestion"] == last["ingestion"]
    # The poller's state did not move either; only the clock-derived fields could.
    assert first["poller"] == last["poller"]


async def test_backlog_age_is_zero_when_caught_up_and_grows_while_behind(
    make_settings: Callable[..., Settings],
) -> None:
    wal = FakeWal()
    # Received 10 s ago, so they are settled and old.
    stamped = int(time.time() * 1000) - 10_000
    keys = wal.seed(2000, ms=stamped)
    service = FakeIngestionService(wal)
    # The server sends 600 and then goes quiet, as a slow one would: the poller holds what
    # reached it (whole chunks of 256) and has processed none (a batch is 1000).
    service.pause_after = 600
    async with FakeIngestionServer(service) as server:
        settings = make_settings(ingestion_grpc_address=server.address)
        async with running(settings) as (http, _backend):
            await service.paused.wait()
            poller = (await http.get("/health")).json()["poller"]
            deadline = time.monotonic() + 60
            while poller["backlog_age_seconds"] is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                poller = (await http.get("/health")).json()["poller"]
            _, samples = await scrape(http)
            await asyncio.sleep(0.3)
            later = (await http.get("/health")).json()["poller"]

            await server.restart()  # cuts the call; the poller resumes and catches up
            body = (await http.get("/health")).json()
            deadline = time.monotonic() + 60
            # Caught up, and all processed: at the first read nothing has settled yet (by the
            # keys' own times all 2000 are within the window of the newest: horizon.py).
            while (
                not body["poller"]["caught_up"] or body["poller"]["spans_processed"] < len(keys)
            ) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                body = (await http.get("/health")).json()
            _, caught_up_samples = await scrape(http)

    assert poller["caught_up"] is False
    assert poller["backlog_age_seconds"] >= 10  # the oldest unprocessed span's age
    assert later["backlog_age_seconds"] > poller["backlog_age_seconds"]
    assert (value(samples, "junjo_poller_backlog_age_seconds") or 0) >= 10
    assert value(samples, "junjo_poller_caught_up") == 0

    assert body["poller"]["caught_up"] is True
    assert body["poller"]["backlog_age_seconds"] == 0
    assert body["poller"]["spans_processed"] == len(keys)
    # The last span is 10 s old, but nothing waits: an alert on backlog age stays quiet.
    assert value(caught_up_samples, "junjo_poller_backlog_age_seconds") == 0


async def test_an_outage_sets_last_error_at_once_and_the_way_back_is_logged_and_counted(
    make_settings: Callable[..., Settings],
    ingestion: FakeIngestionServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="junjo_backend.ingestion.client")
    # A retry deadline far beyond the test: last_error must not wait for it.
    settings = make_settings(
        ingestion_grpc_address=ingestion.address, ingestion_retry_deadline_seconds=3600
    )
    async with running(settings) as (http, backend):
        await until(
            lambda: backend.poller is not None and backend.poller.status.caught_up, "caught up"
        )
        ingestion.service.fail_with = grpc.StatusCode.PERMISSION_DENIED
        await until(lambda: backend.ingestion and backend.ingestion.stream_errors, "an error")
        ingestion.service.fail_with = None

        await ingestion.stop()
        await until(
            lambda: backend.ingestion is not None and backend.ingestion.reachable is False,
            "unreachable",
        )
        down = (await http.get("/health")).json()
        await ingestion.start()
        await until(
            lambda: backend.ingestion is not None and backend.ingestion.reachable is True,
            "reachable again",
        )
        # The poller's own error from before the outage goes with its next completed read.
        await until(
            lambda: backend.poller is not None and backend.poller.status.last_error is None,
            "a read completes",
        )
        back = (await http.get("/health")).json()
        _, samples = await scrape(http)

    assert down["status"] == "degraded"
    assert down["ingestion"]["reachable"] is False
    assert down["poller"]["last_error"].startswith("UNAVAILABLE")
    assert back["ingestion"]["reachable"] is True
    assert back["poller"]["last_error"] is None
    again = [r for r in caplog.records if r.getMessage() == "ingestion-service reachable again"]
    assert len(again) == 1
    assert again[0].levelno == logging.INFO
    assert value(samples, "junjo_ingestion_reconnects_total") == 1
    assert (
        value(samples, "junjo_ingestion_stream_errors_total", code="PERMISSION_DENIED") or 0
    ) >= 1
    assert (value(samples, "junjo_ingestion_stream_errors_total", code="UNAVAILABLE") or 0) >= 1
