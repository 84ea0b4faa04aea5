"""What the ingestion fault scenarios run: the Go tools and `serve` in a subprocess.

Every process writes its output to a file the suite scans for key material; the API key is
created in the database directly (`kit.store_keys`: the CLI would print it) and handed to
the load generator through its environment, never its command line.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

from harness.go_tools import go_tool
from harness.waiting import NeverHappenedError, wait_until
from tests.serve_process import ServeProcess

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .conftest import FaultKit


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


class ServeBackend(ServeProcess):
    """`serve` on the auth port the Go peer dials, its poller read through /health."""

    def __init__(
        self,
        kit: FaultKit,
        *,
        auth_port: int,
        ingestion_address: str,
        name: str,
        env: dict[str, str],
    ) -> None:
        super().__init__(
            {
                "DATABASE_URL": kit.sqlite_url(),
                "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{auth_port}",
                "INGESTION_GRPC_ADDRESS": ingestion_address,
                **env,
            },
            cwd=kit.folder,
            output=kit.output.path,
            name=name,
            per_run=kit.run_env,
        )
        self._http: httpx.AsyncClient | None = None

    async def poller(self) -> PollerView | None:
        """The poller's state from /health, or None while HTTP is not up."""
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.http_url, timeout=5.0)
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

    async def wait_for_poller(
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
            if self.running and not self.alive():
                raise AssertionError(f"{self.name} exited; it wrote:\n{self.text()[-4000:]}")
            return False

        try:
            await wait_until(holds, "the poller condition", limit=limit, every=every)
        except NeverHappenedError:
            raise AssertionError(
                f"condition not met within {limit:g} s; last poller state {last}"
            ) from None
        assert last is not None
        return last

    async def stop_async(self, limit: float = 30.0) -> int | None:
        """Close the HTTP client, then stop (SIGTERM, SIGKILL after `limit`)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        return await super().stop_async(limit)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of `values` (not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]
