"""Shared by the recovery scenarios: the recording runner, WAL seeding, the ledger, auth probes.

Every process started here writes its stdout and stderr to a file from `fault_output`, so
the suite's end-of-run scan sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc
from junjo_backend.database import close_engine, create_engine

if TYPE_CHECKING:
    from collections.abc import Callable

    from junjo_backend.auth.key_store import NewApiKey

    from .conftest import OutputFolder

REPO_ROOT = Path(__file__).resolve().parents[3]
WALSEED = REPO_ROOT / "go-compat-tests" / "bin" / "walseed"
RECORDING_BACKEND = Path(__file__).with_name("recording_backend.py")


def recording_backend_command() -> tuple[str, ...]:
    """The recording runner (`serve` with a ledger sink)."""
    return (sys.executable, str(RECORDING_BACKEND))


@dataclass(frozen=True, slots=True)
class Seeded:
    """What one walseed run wrote."""

    count: int
    first_key: bytes
    last_key: bytes


def seed_wal(wal_dir: Path, count: int, output: OutputFolder) -> Seeded:
    """Write `count` entries straight into a WAL directory (the peer must be stopped)."""
    if not WALSEED.exists():
        raise AssertionError(f"{WALSEED} is missing: run `make peer`")
    log_path = output.path("walseed")
    with log_path.open("wb") as log_file:
        done = subprocess.run(
            [str(WALSEED), "-path", str(wal_dir), "-count", str(count), "-span-bytes", "300"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            check=True,
            timeout=120,
        )
    result = json.loads(done.stdout)
    return Seeded(
        int(result["count"]), bytes.fromhex(result["first_key"]), bytes.fromhex(result["last_key"])
    )


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """What the recording sink committed, as read back from the database."""

    spans: int  # rows in recorded_keys
    distinct_keys: int
    batches: int
    overlapping_batches: int  # batches whose key range starts at or before the previous end
    runs: int  # backend runs that committed at least one batch
    min_key: bytes | None
    max_key: bytes | None

    @property
    def keys_twice(self) -> int:
        """Spans committed more than once."""
        return self.spans - self.distinct_keys


class Ledger:
    """Reads the recording sink's tables and the poller's checkpoint from the SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):  # the backend has not created it yet
                return []
            raise
        finally:
            conn.close()

    def committed(self) -> int:
        """Spans committed so far (sum over batches)."""
        rows = self._query("SELECT coalesce(sum(spans), 0) FROM recorded_batches")
        return int(str(rows[0][0])) if rows else 0

    def reached(self, spans: int) -> bool:
        """Whether at least `spans` spans are committed."""
        return self.committed() >= spans

    def checkpoint(self) -> bytes | None:
        """The poller's checkpoint."""
        rows = self._query("SELECT last_key FROM poller_state WHERE id = 1")
        return bytes(rows[0][0]) if rows and isinstance(rows[0][0], bytes) else None

    def check(self) -> LedgerCheck:
        """Duplicates and overlaps across everything committed."""
        keys = self._query(
            "SELECT count(*), count(DISTINCT key), min(key), max(key) FROM recorded_keys"
        )
        batches = self._query(
            "SELECT run, first_key, last_key FROM recorded_batches ORDER BY first_key"
        )
        overlapping = 0
        previous_end: bytes | None = None
        for _run, first, last in batches:
            assert isinstance(first, bytes)
            assert isinstance(last, bytes)
            if previous_end is not None and first <= previous_end:
                overlapping += 1
            previous_end = last if previous_end is None else max(previous_end, last)
        spans, distinct, low, high = keys[0]
        return LedgerCheck(
            spans=int(str(spans)),
            distinct_keys=int(str(distinct)),
            batches=len(batches),
            overlapping_batches=overlapping,
            runs=len({run for run, _first, _last in batches}),
            min_key=low if isinstance(low, bytes) else None,
            max_key=high if isinstance(high, bytes) else None,
        )


def delivered_spans(path: Path) -> int:
    """Spans the recording sink was handed, committed or not."""
    if not path.exists():
        return 0
    return sum(int(line) for line in path.read_text(encoding="ascii").split())


async def validate_outcome(stub: auth_pb2_grpc.InternalAuthServiceAsyncStub, key: str) -> str:
    """One ValidateApiKey call with the ingestion-service's 5 s deadline: "true", "false",
    or the status code's name."""
    try:
        answer = await stub.ValidateApiKey(auth_pb2.ValidateApiKeyRequest(api_key=key), timeout=5)
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    return "true" if answer.is_valid else "false"


@dataclass(slots=True)
class AuthProbe:
    """Calls ValidateApiKey in a loop for a set of keys and tallies the answers per key kind."""

    stub: auth_pb2_grpc.InternalAuthServiceAsyncStub
    keys: dict[str, Callable[[], str]]  # kind -> a key of that kind for the next call
    tallies: dict[str, Counter[str]]

    async def run(self, stop: asyncio.Event, *, pause: float = 0.01) -> None:
        """Call for every kind in turn until `stop` is set."""
        while not stop.is_set():
            for kind, key in self.keys.items():
                self.tallies.setdefault(kind, Counter())[
                    await validate_outcome(self.stub, key())
                ] += 1
            await asyncio.sleep(pause)


def tally_text(tallies: dict[str, Counter[str]]) -> str:
    """`kind: outcome n, ...; ...` for a table row."""
    return "; ".join(
        f"{kind} " + ", ".join(f"{outcome} {n:,}" for outcome, n in sorted(counter.items()))
        for kind, counter in tallies.items()
    )


@dataclass(frozen=True, slots=True)
class ProbeKeys:
    """A valid key, a revoked one, and a few unknown ones (cycled: the leak scan stays cheap)."""

    valid: NewApiKey
    revoked: NewApiKey
    unknown: tuple[str, ...]

    def kinds(self) -> dict[str, Callable[[], str]]:
        """For AuthProbe: each kind of key and how to pick the next one."""
        unknown = itertools.cycle(self.unknown)
        return {
            "valid": lambda: self.valid.key,
            "revoked": lambda: self.revoked.key,
            "unknown": lambda: next(unknown),
        }


async def sqlite_busy_timeout(database_url: str) -> float:
    """The busy timeout, in seconds, of a connection the backend's engine opens."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            milliseconds = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
    finally:
        await close_engine(engine)
    return float(milliseconds) / 1000
