"""`junjo-backend serve` with one change: the poller's sink records what it commits.

The default sink writes nothing to the database, so a batch committed twice would not show.
This runner is the real `serve` (uvicorn, auth server, lifespan, signal handling) with the
poller's sink swapped for one that, inside the checkpoint's transaction, writes one row per
batch to `recorded_batches` and one row per span to `recorded_keys` (no unique constraint:
a duplicate must be visible, not refused). Outside the transaction it appends each batch's
size to the file named by `JUNJO_FAULT_DELIVERED`, so what the sink was handed but never
committed (rolled back by a kill or a locked database) can be counted as re-delivered.

    JUNJO_FAULT_RUN=N JUNJO_FAULT_DELIVERED=FILE python recording_backend.py

Everything else comes from the environment, as for `serve`.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, Integer, LargeBinary, MetaData, Table
from sqlalchemy.engine import make_url

from junjo_backend import app
from junjo_backend.cli import main as cli
from junjo_backend.poller.loop import SpanPoller
from junjo_backend.store.postgres_store import PostgresStore

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from junjo_backend.ingestion.client import IngestionClient
    from junjo_backend.ingestion.spans import SpanRecord
    from junjo_backend.poller.leadership import PollerLeadership
    from junjo_backend.poller.sinks import PollerStore, SpanSink
    from junjo_backend.settings import Settings

_ledger = MetaData()
recorded_batches = Table(
    "recorded_batches",
    _ledger,
    Column("run", Integer, nullable=False),
    Column("first_key", LargeBinary, nullable=False),
    Column("last_key", LargeBinary, nullable=False),
    Column("spans", Integer, nullable=False),
)
recorded_keys = Table("recorded_keys", _ledger, Column("key", LargeBinary, nullable=False))

LEDGER_SCHEMA = (
    (
        "CREATE TABLE IF NOT EXISTS recorded_batches (run INTEGER NOT NULL,"
        " first_key BLOB NOT NULL, last_key BLOB NOT NULL, spans INTEGER NOT NULL)"
    ),
    "CREATE TABLE IF NOT EXISTS recorded_keys (key BLOB NOT NULL)",
)


class RecordingSink:
    """Writes every batch it is handed to the ledger tables, in the poller's transaction.

    On PostgreSQL it also stores the batch in the PostgreSQL span store, in that same
    transaction (as the store sink does), so the replica rows count the `spans` table too.
    """

    def __init__(self, run: int, delivered: Path, store: PostgresStore | None = None) -> None:
        self._run = run
        self._delivered = delivered
        self._store = store
        self._store_open = False

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:
        """Note the delivery in the file, then record the batch and its keys in the database."""
        with self._delivered.open("a", encoding="ascii") as delivered:
            delivered.write(f"{len(batch)}\n")
        await conn.execute(
            recorded_batches.insert().values(
                run=self._run,
                first_key=batch[0].key,
                last_key=batch[-1].key,
                spans=len(batch),
            )
        )
        await conn.execute(recorded_keys.insert(), [{"key": record.key} for record in batch])
        if self._store is not None:
            if not self._store_open:
                await self._store.open()
                self._store_open = True
            await self._store.write(batch, conn)


class RecordingPoller(SpanPoller):
    """The real poller, given the recording sink whatever `serve` passes."""

    def __init__(
        self,
        client: IngestionClient,
        engine: AsyncEngine,
        sink: SpanSink | None = None,  # noqa: ARG002 (replaced on purpose)
        *,
        settings: Settings,
        leadership: PollerLeadership | None = None,
        store: PollerStore | None = None,  # noqa: ARG002 (the recording sink replaces it)
    ) -> None:
        postgres = make_url(settings.database_url).get_backend_name() == "postgresql"
        recording = RecordingSink(
            int(os.environ["JUNJO_FAULT_RUN"]),
            Path(os.environ["JUNJO_FAULT_DELIVERED"]),
            PostgresStore(engine, converter="thread") if postgres else None,
        )
        super().__init__(client, engine, recording, settings=settings, leadership=leadership)


def create_ledger(database_url: str) -> None:
    """Create the ledger tables in the SQLite file of `database_url` (before `serve` opens it).

    On PostgreSQL the test creates them (replica_helpers.PostgresLedger) before any replica.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        return
    path = url.database
    if not path:
        raise SystemExit("the recording backend needs a SQLite file")
    with sqlite3.connect(path) as conn:
        for statement in LEDGER_SCHEMA:
            conn.execute(statement)
    conn.close()


def main() -> int:
    """Create the ledger, swap the poller class the lifespan uses, run `serve`."""
    create_ledger(os.environ["DATABASE_URL"])
    app.SpanPoller = RecordingPoller  # type: ignore[attr-defined]  # the one change to `serve`
    return cli.main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
