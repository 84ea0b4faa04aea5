"""Shared by the replica scenarios: replicas of the recording backend on one PostgreSQL.

Each replica is the recording backend (`serve` with a ledger sink, recording_backend.py) on
ports of its own; all of them share one PostgreSQL database and one Go peer. The ledger's
tables live in that database, so a span committed by two replicas is two rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, select, text

from junjo_backend.database import close_engine, create_engine, init_schema, poller_state
from junjo_backend.poller.leadership import LOCK_CLASS, LOCK_OBJECT
from tests.serve_process import ServeProcess

from .recording_backend import recorded_batches, recorded_keys
from .recovery_helpers import LedgerCheck, delivered_spans, recording_backend_command

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from tests.postgres_cluster import PostgresCluster

    from .conftest import FaultKit


async def fresh_database(cluster: PostgresCluster) -> str:
    """A new database on the cluster, with the backend's schema and the ledger's tables."""
    url = await cluster.new_database()
    engine = create_engine(url)
    try:
        await init_schema(engine)
        async with engine.begin() as conn:
            await conn.run_sync(recorded_batches.metadata.create_all)
    finally:
        await close_engine(engine)
    return url


class Replica(ServeProcess):
    """One replica: its own auth and HTTP ports, its own file of batches handed to the sink."""

    def __init__(
        self,
        name: str,
        *,
        kit: FaultKit,
        database_url: str,
        ingestion_address: str,
        auth_port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.delivered_file = kit.folder / f"{name}-delivered.txt"
        super().__init__(
            {
                "DATABASE_URL": database_url,
                "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{auth_port or 0}",
                "INGESTION_GRPC_ADDRESS": ingestion_address,
                "JUNJO_FAULT_DELIVERED": str(self.delivered_file),
                **(settings or {}),
            },
            cwd=kit.folder,
            output=kit.output.path,
            command=recording_backend_command(),
            name=name,
            per_run=kit.run_env,
        )

    @property
    def handed(self) -> int:
        """Spans this replica's sink was handed, committed or rolled back, over all its runs."""
        return delivered_spans(self.delivered_file)

    async def poller(self) -> dict[str, Any]:
        """The `poller` part of this replica's /health."""
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.get(f"http://127.0.0.1:{self.http_port}/health")
        body: dict[str, Any] = answer.json()["poller"]
        return body


class PostgresLedger:
    """What the recording sinks committed, and the checkpoint, read from PostgreSQL."""

    def __init__(self, url: str) -> None:
        self._engine: AsyncEngine = create_engine(url)

    async def close(self) -> None:
        """Release the ledger's connections."""
        await close_engine(self._engine)

    async def committed(self) -> int:
        """Spans committed so far (over every replica)."""
        async with self._engine.connect() as conn:
            total = await conn.scalar(select(func.coalesce(func.sum(recorded_batches.c.spans), 0)))
        return int(total or 0)

    async def committed_by_runs(self, split: int) -> tuple[int, int]:
        """Spans committed by runs numbered up to `split`, and by runs numbered above it."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(recorded_batches.c.run, func.sum(recorded_batches.c.spans)).group_by(
                        recorded_batches.c.run
                    )
                )
            ).all()
        low = sum(int(spans) for run, spans in rows if run <= split)
        return low, sum(int(spans) for run, spans in rows if run > split)

    async def checkpoint(self) -> bytes | None:
        """The poller's checkpoint."""
        async with self._engine.connect() as conn:
            key = await conn.scalar(select(poller_state.c.last_key).where(poller_state.c.id == 1))
        return bytes(key) if key else None

    async def lock_holder_pid(self) -> int | None:
        """The PostgreSQL backend of the session holding the poller's advisory lock."""
        async with self._engine.connect() as conn:
            pid = await conn.scalar(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
                    "AND objid = :o AND granted"
                ),
                {"c": LOCK_CLASS, "o": LOCK_OBJECT},
            )
        return None if pid is None else int(pid)

    async def terminate(self, pid: int) -> bool:
        """pg_terminate_backend(pid)."""
        async with self._engine.connect() as conn:
            return bool(await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}))

    async def span_store(self) -> tuple[int, int, int, int]:
        """The PostgreSQL span store: spans, distinct (trace_id, span_id), patches, distinct
        patches by content (a redelivered patch under a new id would count twice)."""
        async with self._engine.connect() as conn:
            spans, distinct_spans = (
                await conn.execute(
                    text("SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM spans")
                )
            ).one()
            patches, distinct_patches = (
                await conn.execute(
                    text(
                        "SELECT count(*), count(DISTINCT (trace_id, span_id, event_time, "
                        "patch_json::text)) FROM state_patches"
                    )
                )
            ).one()
        return int(spans), int(distinct_spans), int(patches), int(distinct_patches)

    async def check(self) -> LedgerCheck:
        """Duplicates and overlaps across everything committed."""
        async with self._engine.connect() as conn:
            spans, distinct = (
                await conn.execute(
                    select(func.count(), func.count(func.distinct(recorded_keys.c.key)))
                )
            ).one()
            # PostgreSQL has no min()/max() for bytea; it orders bytea bytewise.
            low = await conn.scalar(
                select(recorded_keys.c.key).order_by(recorded_keys.c.key).limit(1)
            )
            high = await conn.scalar(
                select(recorded_keys.c.key).order_by(recorded_keys.c.key.desc()).limit(1)
            )
            batches = (
                await conn.execute(
                    select(
                        recorded_batches.c.run,
                        recorded_batches.c.first_key,
                        recorded_batches.c.last_key,
                    ).order_by(recorded_batches.c.first_key)
                )
            ).all()
        overlapping = 0
        previous_end: bytes | None = None
        for _run, first, last in batches:
            if previous_end is not None and first <= previous_end:
                overlapping += 1
            previous_end = last if previous_end is None else max(previous_end, last)
        return LedgerCheck(
            spans=int(spans),
            distinct_keys=int(distinct),
            batches=len(batches),
            overlapping_batches=overlapping,
            runs=len({run for run, _first, _last in batches}),
            min_key=bytes(low) if low is not None else None,
            max_key=bytes(high) if high is not None else None,
        )
