"""Fixtures of the contract suite: the peer image, our auth server, peer containers.

The suite needs a Docker engine. It never skips: without an engine every test errors and
says why. Containers are removed at teardown whatever happened, and a failing test's report
carries the logs of every peer container it used.
"""

from __future__ import annotations

import gc
import warnings
from typing import TYPE_CHECKING

import docker  # type: ignore[import-untyped]  # docker-py ships no types
import pytest

from harness.peer import (
    PeerError,
    PeerImage,
    PeerPorts,
    ensure_image,
    remove_session_containers,
)

from .auth_backend import AuthBackend
from .peer import PEERS, PeerFleet, peer_registry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Generator, Iterator
    from pathlib import Path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the test's peer containers (its own and its module's) to a failure."""
    del call
    report = yield
    if report.failed:
        for node in item.listchain():
            for peer in node.stash.get(PEERS, []):
                report.sections.append((f"ingestion peer {peer.name} logs", peer.logs()))
    return report


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The Docker engine; the suite fails here, loudly, when there is none."""
    # Our own teardown removes the containers (labelled with the session), passed or failed.
    client: docker.DockerClient | None = None
    unreachable = None
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        unreachable = str(error)
        if client is not None:
            client.close()
    if client is None or unreachable is not None:
        # The failed connection leaves a socket for the garbage collector; collect it now,
        # quietly, so the one error the session reports is this one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        pytest.fail(
            f"the compat suite needs a running Docker engine and could not reach one: "
            f"{unreachable}. It does not skip: start dockerd (see python/tests/compat/README.md).",
            pytrace=False,
        )
    try:
        yield client
    finally:
        remove_session_containers(client)
        client.close()


@pytest.fixture(scope="session")
def peer_image(docker_client: docker.DockerClient) -> PeerImage:
    """The peer image: ours (built once per source hash) or JUNJO_COMPAT_INGESTION_IMAGE."""
    return ensure_image(docker_client)


@pytest.fixture
def peer_ports(peer_image: PeerImage) -> PeerPorts:
    """Ports for one test's peer and auth server; a clear failure when fixed ones are taken."""
    try:
        return PeerPorts.pick(peer_image)
    except PeerError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
async def idle_auth_backend(tmp_path: Path, peer_ports: PeerPorts) -> AsyncIterator[AuthBackend]:
    """Our key database, with the auth server not started yet."""
    backend = AuthBackend(tmp_path / "junjo.db", peer_ports.backend)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def auth_backend(idle_auth_backend: AuthBackend) -> AuthBackend:
    """Our AuthServer serving on `peer_ports.backend`, where the peer dials."""
    await idle_auth_backend.start()
    return idle_auth_backend


@pytest.fixture
async def peers(
    request: pytest.FixtureRequest, peer_image: PeerImage, tmp_path: Path
) -> AsyncIterator[PeerFleet]:
    """Starts peer containers for one test; removes them afterwards."""
    fleet = PeerFleet(peer_image, tmp_path, peer_registry(request.node))
    try:
        yield fleet
    finally:
        await fleet.close()
