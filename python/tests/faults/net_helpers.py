"""What the network fault scenarios share: a real `serve` subprocess writing to the fault
output, its RSS, the Go load generator, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.go_tools import go_tool
from harness.waiting import NeverHappenedError, wait_until_sync

if TYPE_CHECKING:
    from collections.abc import Iterator


# The start-up banner names both ports, in text (`auth_grpc=127.0.0.1:PORT`) and JSON
# (`"auth_grpc": "127.0.0.1:PORT"`) logs alike.
_AUTH_ADDRESS = re.compile(r'auth_grpc"?[=:]\s*"?([0-9.]+:\d+)')
_HTTP_PORT = re.compile(r'http_port"?[=:]\s*(\d+)')
_READY = "junjo-backend ready"


@dataclass(frozen=True, slots=True)
class RunningBackend:
    """A `junjo-backend serve` subprocess and where it listens."""

    process: subprocess.Popen[bytes]
    auth_address: str
    http_port: int
    output: Path

    def rss_kib(self) -> int:
        """The server's resident set size now, in KiB (from /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line: the server has exited")

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process.poll() is None


@contextlib.contextmanager
def running_backend(
    folder: Path, output: Path, log_env: dict[str, str], **env: str
) -> Iterator[RunningBackend]:
    """`serve` on ephemeral loopback ports with its database in `folder`; stopped on exit.

    Everything the process writes goes to `output` (the fault suite scans it for keys).
    """
    settings = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'junjo.db'}",
        "AUTH_GRPC_LISTEN_ADDRESS": "127.0.0.1:0",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        "INGESTION_GRPC_ADDRESS": "127.0.0.1:1",
        "POLLER_ENABLED": "false",
        "GRPC_SHUTDOWN_GRACE_SECONDS": "1",
        **log_env,
        **env,
    }
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "junjo_backend.cli.main", "serve"],
            env={**os.environ, **settings},
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        banner = _wait_for_banner(process, output, within=60.0)
        auth = _AUTH_ADDRESS.search(banner)
        http = _HTTP_PORT.search(banner)
        assert auth is not None, banner
        assert http is not None, banner
        yield RunningBackend(process, auth.group(1), int(http.group(1)), output)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_banner(process: subprocess.Popen[bytes], output: Path, within: float) -> str:
    banner: list[str] = []

    def ready_or_gone() -> bool:
        lines = output.read_text(errors="replace").splitlines()
        banner.extend(line for line in lines if _READY in line)
        return bool(banner) or process.poll() is not None

    with contextlib.suppress(NeverHappenedError):
        wait_until_sync(ready_or_gone, "serve's ready line", limit=within)
    if not banner:
        text = output.read_text(errors="replace")
        raise AssertionError(f"serve did not become ready; it wrote:\n{text[-4000:]}")
    return banner[0]


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
