"""PostgreSQL stopped and restarted on the same port while `serve` answers ValidateApiKey.

The backend signs in with a password holding `@` and `/`, percent-encoded in its URL; the
suite's output scan holds that no piece of it is ever written.

During the outage every answer is `true` only for the valid key (from a snapshot still
within its max age), `false` or INTERNAL otherwise: never `true` for an unknown or revoked
key, and never a timeout. After the restart the server recovers on its own: a key created
afterwards validates and a key revoked afterwards stops validating.

The cluster is a throwaway one of this module's own (tests/postgres_cluster.py's
PostgresCluster: `postgres` as a child process, as `nobody` when we are root), not the
session's: this test stops it. Its `stop` is a fast shutdown (SIGINT, what `pg_ctl stop -m
fast` sends), its `start` the same command on the same port and data folder.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING

import grpc
import pytest

from harness.waiting import NeverHappenedError, wait_until
from junjo_backend._wire.ingestion import auth_pb2_grpc
from junjo_backend.auth.key_store import create_api_key
from junjo_backend.database import close_engine, create_engine
from tests.postgres_cluster import PostgresCluster, throwaway_cluster

from .recovery_helpers import (
    AuthProbe,
    tally_text,
    validate_outcome,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .conftest import FaultKit, KeyRegistry, OutputFolder

OUTAGES = 2
OUTAGE_SECONDS = 3.0  # several times the key snapshot's max age (at most 1 s)
PROBE_TASKS = 4
# Hang guards only (generous): figures go to the fault table.
RECOVERY_LIMIT_SECONDS = 60.0


@pytest.fixture(scope="module")
def postgres_to_restart() -> Iterator[PostgresCluster]:
    """A throwaway cluster of this module's own, since the test stops and restarts it.

    `make faults` runs under CI=true in CI, where a missing PostgreSQL fails the run.
    """
    with throwaway_cluster("junjo-faults-pg-") as cluster:
        yield cluster


@pytest.fixture
async def database_url(postgres_to_restart: PostgresCluster, fault_keys: KeyRegistry) -> str:
    """A database the backend signs in to with a password that holds '@' and '/'.

    Every log line and error that names the database must mask the password whole: the
    suite's output scan watches for it.
    """
    password = f"p@ss/{secrets.token_urlsafe(12)}"
    fault_keys.add_password(password)
    return await postgres_to_restart.new_password_database("junjo_app", password)


def _revoke_with_cli(
    database_url: str,
    key_id: str,
    output: OutputFolder,
    log_env: Callable[[], dict[str, str]],
) -> None:
    """`junjo-backend api-keys revoke ID`, its output to the suite's folder."""
    with output.path("cli-revoke").open("wb") as out:
        subprocess.run(
            [sys.executable, "-m", "junjo_backend.cli.main", "api-keys", "revoke", key_id],
            env={**os.environ, **log_env(), "DATABASE_URL": database_url},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )


async def _until(
    stub: auth_pb2_grpc.InternalAuthServiceAsyncStub, key: str, outcome: str, what: str
) -> float:
    """Call until `key` gets `outcome`; seconds it took (the limit is a hang guard)."""
    answers: list[str] = []

    async def answered() -> bool:
        answers.append(await validate_outcome(stub, key))
        return answers[-1] == outcome

    try:
        return await wait_until(answered, what, limit=RECOVERY_LIMIT_SECONDS, every=0.02)
    except NeverHappenedError:
        raise AssertionError(
            f"{what}: still {answers[-1]} after {RECOVERY_LIMIT_SECONDS:g} s"
        ) from None


async def test_postgresql_stopped_and_restarted_under_load(
    postgres_to_restart: PostgresCluster, database_url: str, kit: FaultKit
) -> None:
    keys = await kit.probe_keys(database_url)
    valid = keys.valid
    backend = kit.serve(
        # The poller is off, so nothing dials the ingestion-service but /health.
        {"DATABASE_URL": database_url, "POLLER_ENABLED": "false"},
        name="serve-postgres",
    )
    phases: dict[str, dict[str, Counter[str]]] = {"before": {}, "outage": {}, "after": {}}
    recoveries: list[float] = []
    stop_probe = asyncio.Event()
    try:
        backend.start()
        await backend.wait_ready()
        async with grpc.aio.insecure_channel(backend.auth_address) as channel:
            stub = auth_pb2_grpc.InternalAuthServiceStub(channel)
            probe = AuthProbe(stub, keys.kinds(), phases["before"])
            probing = [asyncio.create_task(probe.run(stop_probe)) for _ in range(PROBE_TASKS)]
            try:
                await asyncio.sleep(1.0)
                for _ in range(OUTAGES):
                    probe.tallies = phases["outage"]
                    await asyncio.to_thread(postgres_to_restart.stop)
                    await asyncio.sleep(OUTAGE_SECONDS)
                    await asyncio.to_thread(postgres_to_restart.start)
                    probe.tallies = phases["after"]
                    recoveries.append(await _until(stub, valid.key, "true", "valid after restart"))
                    await asyncio.sleep(1.0)

                # Recovered for writes made after the restart too.
                engine = create_engine(database_url)
                try:
                    created = await create_api_key(engine, "after the outages")
                finally:
                    await close_engine(engine)
                kit.keys.add(created.key)
                created_after = await _until(stub, created.key, "true", "key created after")
                _revoke_with_cli(database_url, valid.id, kit.output, kit.log_env)
                revoked_after = await _until(stub, valid.key, "false", "key revoked after")
            finally:
                stop_probe.set()
                await asyncio.gather(*probing)
        assert backend.stop() == 0, backend.text()
    finally:
        backend.close()

    calls = sum(sum(c.values()) for tallies in phases.values() for c in tallies.values())
    for name, tallies in phases.items():
        outcomes = Counter[str]()
        for counter in tallies.values():
            outcomes.update(counter)
        # Every call is answered: an answer or INTERNAL, never a timeout or UNAVAILABLE.
        assert set(outcomes) <= {"true", "false", "INTERNAL"}, (name, tallies)
        assert tallies["unknown"]["true"] == 0, (name, tallies)
        # The revoked key was revoked before the start; the valid one only at the very end
        # (its `false` answers after that are tallied under "after").
        assert tallies["revoked"]["true"] == 0, (name, tallies)
    assert phases["outage"]["valid"]["INTERNAL"] > 0, "no call failed closed during the outage"
    assert phases["after"]["valid"]["true"] > 0
    kit.table.add(
        "PostgreSQL stopped (fast) and restarted on the same port under auth load",
        f"{OUTAGES} x {OUTAGE_SECONDS:g} s outages, {calls:,} calls",
        f"0 true for unknown or revoked keys; outage: {tally_text(phases['outage'])}; "
        f"valid again {min(recoveries):.2f}-{max(recoveries):.2f} s after restart; "
        f"new key valid after {created_after:.2f} s, revocation effective after "
        f"{revoked_after:.2f} s",
    )
