"""The Go ingestion peer in the contract and fault suites: async handles and per-test fleets.

`harness.peer` builds the image and runs the containers; this adds what pytest needs: an
async face (its calls block, so they run in a thread) and a registry of the peers a test
or module started, whose logs a failed test's report carries.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from harness.peer import Peer, PeerImage, PeerPorts

if TYPE_CHECKING:
    from pathlib import Path

    import docker  # type: ignore[import-untyped]  # docker-py ships no types

# The peers a node (test, module) started, for the failure report.
PEERS = pytest.StashKey[list["PeerContainer"]]()


def peer_registry(node: pytest.Item | pytest.Collector) -> list[PeerContainer]:
    """The list where `node`'s peers are recorded (the report hook reads it)."""
    return node.stash.setdefault(PEERS, [])


class PeerContainer:
    """A peer container driven from async tests: `harness.peer.Peer`'s calls in a thread."""

    def __init__(
        self,
        image: PeerImage,
        ports: PeerPorts,
        wal_dir: Path,
        name: str,
        client: docker.DockerClient | None = None,
    ) -> None:
        self.peer = Peer(ports, wal_dir, name, image=image, client=client)

    @property
    def name(self) -> str:
        """The peer's name in logs and reports."""
        return self.peer.name

    @property
    def ports(self) -> PeerPorts:
        """Its ports and our auth server's."""
        return self.peer.ports

    @property
    def public_address(self) -> str:
        """Where OTLP exporters send spans."""
        return self.peer.public_address

    @property
    def internal_address(self) -> str:
        """Where the backend reads spans (ReadSpans) and probes health."""
        return self.peer.internal_address

    async def start(self) -> None:
        """Start a run; it serves once our auth server has answered its readiness check."""
        await asyncio.to_thread(self.peer.start)

    async def stop(self) -> int | None:
        """SIGTERM, wait for a clean exit (SIGKILL after 10 s), remove; the exit code."""
        return await asyncio.to_thread(self.peer.stop)

    async def restart(self) -> int | None:
        """Stop gracefully and start again on the same ports and WAL directory; the exit code."""
        return await asyncio.to_thread(self.peer.restart)

    async def running(self) -> bool:
        """Whether the current run's process is alive."""
        return await asyncio.to_thread(self.peer.running)

    async def wait_serving(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 (a bound on polling, not one call)
        """Return once the peer serves; PeerError (with its logs) if it never does."""
        await asyncio.to_thread(self.peer.wait_serving, timeout)

    def logs(self) -> str:
        """stdout and stderr of every run so far, the current one last."""
        return self.peer.logs()


class PeerFleet:
    """The peer containers of one test or module: each removed at `close`, logs kept for reports."""

    def __init__(
        self,
        image: PeerImage,
        base_dir: Path,
        registry: list[PeerContainer],
        client: docker.DockerClient | None = None,
    ) -> None:
        self.image = image
        self._base_dir = base_dir
        self._registry = registry
        self._client = client
        self._peers: list[PeerContainer] = []

    async def launch(
        self, ports: PeerPorts, *, wal_dir: Path | None = None, wait: bool = True
    ) -> PeerContainer:
        """Start a peer (its WAL in a new folder unless given); by default wait until it serves."""
        number = len(self._peers) + 1
        peer = PeerContainer(
            self.image,
            ports,
            wal_dir or self._base_dir / f"wal-{number}",
            name=f"peer-{number}",
            client=self._client,
        )
        self._peers.append(peer)
        self._registry.append(peer)
        await peer.start()
        if wait:
            await peer.wait_serving()
        return peer

    async def close(self) -> None:
        """Stop and remove every peer this fleet started."""
        for peer in self._peers:
            await peer.stop()
