"""The code path for the published Go image, run here against our peer image under another name.

Hosted CI runs the whole suite against `mdrideout/junjo-server-ingestion-service:0.61.1`;
these machines reach no registry. So this test tags our peer image under that very name
(unless the real image is present: then it runs that one, and leaves its tag alone) and
points `JUNJO_COMPAT_INGESTION_IMAGE` at it: the suite then takes the published-image
path (the fixed ports 50051/50052, our auth server on 50053, `extra_hosts` for
`junjo-server-backend`, none of our peer's settings). Our peer's defaults are the deployed
service's, so it runs unconfigured, as the published image does. Two suite tests run that
way in a child pytest; the fixed ports make it a small set, and a clear failure when taken.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import docker.errors  # type: ignore[import-untyped]  # docker-py ships no types
import pytest

from harness.peer import (
    IMAGE_ENV,
    PUBLISHED_BACKEND_HOST,
    PUBLISHED_IMAGE,
    PUBLISHED_IMAGE_REPOSITORY,
    PUBLISHED_PORTS,
    PUBLISHED_RELEASE,
    HostContainer,
    Peer,
    PeerError,
    PeerImage,
    PeerPorts,
    ensure_image,
    ensure_ports_free,
)
from harness.waiting import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.compat

RUN_AS_PUBLISHED = (
    "tests/compat/test_auth_compat.py::test_a_key_from_our_database_is_accepted_and_its_spans_stored",
    "tests/compat/test_ingestion_compat.py::test_spans_arrive_byte_exact_in_the_order_sent",
)


@pytest.fixture
def standin(docker_client: docker.DockerClient, request: pytest.FixtureRequest) -> Iterator[str]:
    if os.environ.get(IMAGE_ENV, "").strip():
        pytest.skip(f"this session already runs the whole suite against {IMAGE_ENV}")
    ours: PeerImage = request.getfixturevalue("peer_image")
    assert ours.built_here
    peer = docker_client.images.get(ours.tag)
    try:
        present = docker_client.images.get(PUBLISHED_IMAGE)
    except docker.errors.ImageNotFound:
        present = None
    if present is not None and present.id != peer.id:
        yield PUBLISHED_IMAGE  # the real one, pulled by someone: never retagged or removed
        return
    peer.tag(PUBLISHED_IMAGE_REPOSITORY, PUBLISHED_RELEASE)
    yield PUBLISHED_IMAGE
    # Untag only: the image itself is our cached peer image.
    with contextlib.suppress(docker.errors.APIError):
        docker_client.images.remove(PUBLISHED_IMAGE, noprune=True)


def test_the_published_path_is_what_the_suite_takes_for_another_image(
    standin: str,
    docker_client: docker.DockerClient,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(IMAGE_ENV, standin)
    image = ensure_image(docker_client)
    assert image == PeerImage(standin, built_here=False)
    peer = Peer(
        PeerPorts(*PUBLISHED_PORTS), tmp_path / "wal", "standin", image=image, client=docker_client
    )
    assert isinstance(peer.runner, HostContainer)
    options = peer.runner.options
    environment = options["environment"]
    assert isinstance(environment, dict)
    assert options["network_mode"] == "host"
    assert options["extra_hosts"] == {PUBLISHED_BACKEND_HOST: "127.0.0.1"}
    assert environment.keys() == {"GRPC_PORT", "INTERNAL_GRPC_PORT", "BADGERDB_PATH"}


def test_the_suite_passes_against_the_stand_in_on_the_published_path(
    standin: str, repo_root: Path
) -> None:
    env = {**os.environ, IMAGE_ENV: standin}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *RUN_AS_PUBLISHED],
        cwd=repo_root / "python",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{len(RUN_AS_PUBLISHED)} passed" in output, output


def test_taken_fixed_ports_fail_with_a_clear_message() -> None:
    # An ephemeral port held here stands for a fixed one held by another process.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        free = free_port()
        with pytest.raises(PeerError, match=rf"port\(s\) {held} already in use") as failure:
            ensure_ports_free((free, held), PUBLISHED_IMAGE)
    assert "fixed ports" in str(failure.value)
    assert str(free) not in str(failure.value).split("already")[0]
