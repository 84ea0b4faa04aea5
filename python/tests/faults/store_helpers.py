"""The span store's fault scenarios: `serve` with its DuckDB store against the Go peer.

`StoreBackend` is one `serve` process at a time on fixed ports (so the peer, which dials
its auth server, keeps working across restarts), its output in the suite's output folder.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from typing import TYPE_CHECKING

import duckdb
import httpx

from harness.waiting import free_port, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from harness.peer import PeerPorts

    from .conftest import FaultKit

# Hang guards only (figures go to the fault table).
DRAIN_LIMIT_SECONDS = 240.0
STARTUP_LIMIT_SECONDS = 120.0


class StoreBackend:
    """`serve` with a DuckDB store in `folder` (or at `store`), against the peer on `ports`."""

    def __init__(
        self,
        folder: Path,
        ports: PeerPorts,
        kit: FaultKit,
        name: str,
        *,
        store: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = name
        self.database = folder / "junjo.db"
        self.store = store or folder / "otel_data.db"
        self.http = f"http://127.0.0.1:{free_port()}"
        self.serve = kit.serve(
            {
                "DATABASE_URL": f"sqlite+aiosqlite:///{self.database}",
                "SPAN_STORE": "duckdb",
                "SPAN_STORE_DUCKDB_PATH": str(self.store),
                "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{ports.backend}",
                "INGESTION_GRPC_ADDRESS": f"127.0.0.1:{ports.internal}",
                "HTTP_PORT": self.http.rsplit(":", 1)[1],
                "POLLER_IDLE_WAIT_SECONDS": "0.1",
                "POLLER_SETTLE_SECONDS": "0.1",
                "POLLER_MAX_BACKOFF_SECONDS": "0.5",
                "POLLER_LEADER_RETRY_SECONDS": "0.5",
                **(env or {}),
            },
            name=name,
        )

    def start(self) -> None:
        """Start the next run."""
        self.serve.start()

    async def wait_ready(self) -> None:
        """Until the run logged its ready line (a loaded machine takes a while to import)."""
        await self.serve.wait_ready(limit=STARTUP_LIMIT_SECONDS)

    def stop(self) -> int | None:
        """SIGTERM; the exit status."""
        return self.serve.stop()

    def close(self) -> None:
        """Make sure no run is left (teardown)."""
        self.serve.close()

    def output(self) -> str:
        """What every run wrote (for a failure message)."""
        return self.serve.text()[-4000:]

    def count_in_output(self, text: str) -> int:
        """How many times `text` occurs in every run's output."""
        return self.serve.count_in_output(text)

    def exit_status(self) -> int | None:
        """The current run's exit status once it has ended by itself (it is then reaped)."""
        if not self.serve.running or self.serve.alive():
            return None
        return self.serve.wait()

    def checkpoint(self) -> bytes | None:
        """The poller's checkpoint in the SQLite file."""
        if not self.database.exists():
            return None
        with contextlib.closing(sqlite3.connect(self.database, timeout=30)) as conn:
            try:
                row = conn.execute("SELECT last_key FROM poller_state WHERE id = 1").fetchone()
            except sqlite3.OperationalError:  # before the schema exists
                return None
        return None if row is None or row[0] is None else bytes(row[0])

    async def health(self) -> dict[str, object] | None:
        """`/health`, or None while HTTP is not up."""
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                answer = (await http.get(f"{self.http}/health")).json()
        except httpx.TransportError:
            return None
        return answer if isinstance(answer, dict) else None

    async def store_health(self) -> dict[str, object]:
        """`/health`'s span_store section ({} while HTTP is not up)."""
        health = await self.health()
        section = {} if health is None else health.get("span_store")
        return section if isinstance(section, dict) else {}

    async def wait_stored(self, last_key: bytes, limit: float = DRAIN_LIMIT_SECONDS) -> float:
        """Until the store's watermark and the checkpoint are both `last_key`; the seconds."""

        async def there() -> bool:
            section = await self.store_health()
            return section.get("watermark") == last_key.hex() and self.checkpoint() == last_key

        return await wait_until(there, f"{self.name} stores up to {last_key.hex()}", limit=limit)


def store_watermark(path: Path) -> bytes | None:
    """The watermark of a store file nobody holds."""
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as db:
        row = db.execute("SELECT last_key FROM junjo_store_watermark").fetchone()
    return None if row is None else bytes(row[0])


def rows_differing(first: Path, second: Path) -> dict[str, int]:
    """Per table (spans, state_patches): rows in one file and not in the other, both ways."""
    with contextlib.closing(duckdb.connect()) as db:
        db.execute(f"ATTACH '{first}' AS a (READ_ONLY)")
        db.execute(f"ATTACH '{second}' AS b (READ_ONLY)")
        differing = {}
        for table in ("spans", "state_patches"):
            count = 0
            for one, other in (("a", "b"), ("b", "a")):
                row = db.execute(
                    f"SELECT count(*) FROM (SELECT * FROM {one}.{table} "  # noqa: S608 (constants)
                    f"EXCEPT ALL SELECT * FROM {other}.{table})"
                ).fetchone()
                count += int(row[0]) if row else 0
            differing[table] = count
        return differing


def mount_tmpfs(path: Path, size: str) -> None:
    """A tmpfs of `size` at `path` (the suite runs as root), or remount it at that size."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.path.ismount(path)
    options = f"remount,size={size}" if mounted else f"size={size}"
    command = ["mount", "-o", options, str(path)] if mounted else ["mount", "-t", "tmpfs"]
    if not mounted:
        command += ["-o", options, "tmpfs", str(path)]
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def unmount(path: Path) -> None:
    """Undo `mount_tmpfs` (at teardown)."""
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)
