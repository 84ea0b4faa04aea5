"""What the ingestion fault scenarios run: the Go tools and `serve` in a subprocess.

Every process writes its output to a file the suite scans for key material; the API key is
created in the database directly (`kit.store_keys`: the CLI would print it) and handed to
the load generator through its environment, never its command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from harness.go_tools import go_tool
from harness.waiting import NeverHappenedError, free_port, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def run_go_tool(name: str, arguments: list[str], output: Path, **env: str) -> dict[str, Any]:
    """Run a Go tool that prints one JSON object; stderr goes to `output`."""
    with output.open("w") as stderr:
        done = subprocess.run(
            [str(go_tool(name, rebuild=True)), *arguments],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=600,  # a hang guard: every tool bounds itself well within it
            check=False,
        )
    if done.returncode != 0:
        raise AssertionError(f"{name} exited {done.returncode}: {output.read_text()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@dataclass(frozen=True, slots=True)
class PollerView:
    """The poller part of one /health answer."""

    spans_processed: int
    caught_up: bool
    entries_skipped: int
    backlog_age_seconds: float | None
    last_key_received_at: float | None  # Unix seconds
    last_key: str | None
    last_error: str | None


class ServeBackend:
    """`junjo-backend serve` in a subprocess on loopback ports, its output in one file."""

    def __init__(
        self,
        folder: Path,
        *,
        auth_port: int,
        ingestion_address: str,
        output: Path,
        env: dict[str, str],
    ) -> None:
        self.http_port = free_port()
        self._folder = folder
        self._output = output
        self._env = {
            **os.environ,
            "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'junjo.db'}",
            "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{auth_port}",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "INGESTION_GRPC_ADDRESS": ingestion_address,
            **env,
        }
        self._process: subprocess.Popen[bytes] | None = None
        self._http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=5.0)

    def start(self) -> None:
        """Start serving (the Go peer's start-up waits for the auth server)."""
        with self._output.open("ab") as output:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "junjo_backend.cli.main", "serve"],
                env=self._env,
                cwd=self._folder,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    async def poller(self) -> PollerView | None:
        """The poller's state from /health, or None while HTTP is not up."""
        try:
            answer = await self._http.get("/health")
        except httpx.TransportError:
            return None
        body = answer.json()["poller"]
        return PollerView(
            spans_processed=int(body["spans_processed"]),
            caught_up=bool(body["caught_up"]),
            entries_skipped=int(body["entries_skipped"]),
            backlog_age_seconds=body["backlog_age_seconds"],
            last_key_received_at=None
            if body["last_key_received_at"] is None
            else datetime.fromisoformat(body["last_key_received_at"]).timestamp(),
            last_key=body["last_key"],
            last_error=body["last_error"],
        )

    async def wait_for(
        self, condition: Callable[[PollerView], bool], *, limit: float, every: float = 0.1
    ) -> PollerView:
        """Poll /health until `condition` holds; AssertionError after `limit` s (a hang guard)."""
        last: PollerView | None = None

        async def holds() -> bool:
            nonlocal last
            view = await self.poller()
            if view is not None:
                last = view
                if condition(view):
                    return True
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(f"serve exited {self._process.returncode}; see {self._output}")
            return False

        try:
            await wait_until(holds, "the poller condition", limit=limit, every=every)
        except NeverHappenedError:
            raise AssertionError(
                f"condition not met within {limit:g} s; last poller state {last}"
            ) from None
        assert last is not None
        return last

    async def stop(self) -> int | None:
        """SIGTERM and wait for the exit (SIGKILL after a guard); the exit status."""
        await self._http.aclose()
        process = self._process
        if process is None:
            return None
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            return await asyncio.to_thread(process.wait)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]
