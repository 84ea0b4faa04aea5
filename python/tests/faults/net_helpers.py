"""What the network fault scenarios share: a real `serve` subprocess (its RSS too) writing
to the fault output, the Go load generator, percentiles."""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import TYPE_CHECKING, Any

from harness.go_tools import go_tool

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.serve_process import ServeProcess

    from .conftest import FaultKit


@contextlib.contextmanager
def running_backend(kit: FaultKit, name: str, **env: str) -> Iterator[ServeProcess]:
    """`serve` on ephemeral loopback ports with its database in the test's folder, the poller
    off; ready when yielded, stopped (SIGTERM, then SIGKILL) on exit."""
    backend = kit.serve(
        {"DATABASE_URL": kit.sqlite_url(), "POLLER_ENABLED": "false", **env}, name=name
    )
    with backend:
        yield backend.start().wait_ready_sync()


def authload(
    address: str, keys_file: Path, stderr: Path, seconds: float, **flags: object
) -> dict[str, Any]:
    """One authload run (grpc-go, one connection, like the ingestion-service); its report."""
    args = [
        str(go_tool("authload")),
        f"-addr={address}",
        f"-keys={keys_file}",
        f"-duration={seconds}s",
        *(f"-{name.replace('_', '-')}={value}" for name, value in flags.items()),
    ]
    with stderr.open("ab") as err:
        done = subprocess.run(
            args, stdout=subprocess.PIPE, stderr=err, timeout=seconds + 60, check=True
        )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of `samples` (not empty)."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, int(fraction * len(ordered) + 0.999999) - 1))
    return ordered[rank]
