"""A poller in a process of its own, for the kill-and-resume test.

Its sink appends each key (hex, one a line) to a file and fsyncs before returning, so the
file holds at least everything whose checkpoint was committed. It writes `START` first, so
the test can tell the runs apart, and stops cleanly on SIGTERM (SIGKILL is the point).

    python poller_runner.py ADDRESS DATABASE_URL KEYS_FILE
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.ingestion.client import IngestionClient
from junjo_backend.logs import configure_logging
from junjo_backend.poller.loop import SpanPoller
from junjo_backend.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from junjo_backend.ingestion.spans import SpanRecord


class KeyFileSink:
    """Appends keys to a file, durably, before the poller commits its checkpoint."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _append(self, text: str) -> None:
        with self._path.open("a", encoding="ascii") as keys:
            keys.write(text)
            keys.flush()
            os.fsync(keys.fileno())

    def mark_start(self) -> None:
        """Note that a new process starts here."""
        self._append("START\n")

    async def handle(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> None:  # noqa: ARG002 (writes a file, not the database)
        """Append the batch's keys and fsync."""
        self._append("".join(f"{record.key.hex()}\n" for record in batch))


async def run(address: str, database_url: str, keys_file: Path) -> None:
    """Poll until SIGTERM."""
    settings = Settings(
        database_url=database_url,
        ingestion_grpc_address=address,
        poller_batch_size=100,
        poller_idle_wait_seconds=0.05,
        poller_max_backoff_seconds=0.5,
    )
    configure_logging("WARNING")
    engine = create_engine(database_url)
    await init_schema(engine)
    sink = KeyFileSink(keys_file)
    sink.mark_start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with IngestionClient(settings=settings) as client:
        poller = SpanPoller(client, engine, sink, settings=settings)
        await poller.start()
        await stop.wait()
        await poller.stop()
    await close_engine(engine)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
