"""The README's compose command, brought up: both services healthy, spans sent and drained.

`INGESTION_IMAGE=junjo-ingestion-peer:demo INGESTION_HEALTH_PROBE=/ingestion-peer docker
compose up -d`, with the local images (`--no-build`; nothing can be pulled here): the backend
image `make image` builds, and our Go peer's image tagged as the README names it. It runs on
the compose project's own network, a user-defined bridge, which works under `dockerd
--bridge=none` (that turns off only the default bridge). A project of its own (its name,
network and volumes), free host ports, and `down -v` at the end, passed or failed.

Issue 20: with the peer image, compose kept the ingestion container unhealthy (its check
dialled `localhost:50052`, which a FROM-scratch Go binary asks the network's DNS for).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest
from docker.errors import APIError, ImageNotFound  # type: ignore[import-untyped]

from harness.go_tools import go_tool
from harness.peer import IMAGE_ENV, ensure_image, shared_client
from harness.waiting import NeverHappenedError, free_ports, wait_until_sync
from tests.image.image_helpers import BACKEND_IMAGE, docker, missing

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.timeout(420)

README_PEER_IMAGE = "junjo-ingestion-peer:demo"
SPANS = 2_000
# Hang guards: each wait ends far sooner when compose is right (the health checks run every
# 10 s, and the ingestion-service starts once the backend is healthy).
HEALTHY_WITHIN = 150.0
DRAINED_WITHIN = 60.0
COMPOSE_TIMEOUT_SECONDS = 300
_CREATED_KEY = re.compile(r"^\s*([0-9A-Za-z]{64})\s*$", re.MULTILINE)


class Project:
    """One compose project of compose.yaml: its own name, network and volumes."""

    def __init__(self, cli: list[str], repo_root: Path, tmp_path: Path, env: dict[str, str]):
        self.name = f"junjo-compose-test-{uuid.uuid4().hex[:10]}"
        self.network = f"{self.name}_junjo"
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
        self._base = [
            *cli,
            "--env-file",
            str(env_file),
            "--project-name",
            self.name,
            "--project-directory",
            str(repo_root),
            "-f",
            str(repo_root / "compose.yaml"),
        ]
        self._env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One compose command of this project, output captured; the caller judges it."""
        return subprocess.run(
            [*self._base, *args],
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT_SECONDS,
            check=False,
            env=self._env,
        )

    def container(self, service: str) -> str:
        """The id of the service's container."""
        listed = self.run("ps", "-q", service)
        assert listed.returncode == 0, listed.stderr
        return listed.stdout.strip()

    def health(self, service: str) -> str:
        """The service's health status: starting, healthy, unhealthy (or none yet)."""
        container = self.container(service)
        if not container:
            return "none"
        inspected = docker("inspect", "-f", "{{.State.Health.Status}}", container)
        return inspected.stdout.strip() or "none"

    def networks(self, service: str) -> set[str]:
        """The networks the service's container is attached to."""
        inspected = docker(
            "inspect", "-f", "{{json .NetworkSettings.Networks}}", self.container(service)
        )
        return set(json.loads(inspected.stdout))

    def logs(self) -> str:
        """Both services' logs (never a key: the backend does not log key material)."""
        return self.run("logs", "--no-color").stdout[-6000:]

    def down(self) -> None:
        """Containers, network and volumes removed; whatever `down` left, removed by label."""
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5")
        label = f"label=com.docker.compose.project={self.name}"
        for kind, remove in (("ps", ["rm", "-f", "-v"]), ("network", ["network", "rm"])):
            listed = docker(
                *(["ps", "-aq"] if kind == "ps" else ["network", "ls", "-q"]), "--filter", label
            )
            for item in listed.stdout.split():
                docker(*remove, item)
        volumes = docker("volume", "ls", "-q", "--filter", label)
        for volume in volumes.stdout.split():
            docker("volume", "rm", "-f", volume)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project still there."""
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for listing in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            found.extend(docker(*listing, "--filter", label).stdout.split())
        return found


@pytest.fixture
def readme_peer_image(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Our Go peer's image (built from the sources unless present), tagged as the README says."""
    if docker("info").returncode != 0:
        missing("no Docker engine answered `docker info`", "start dockerd")
    if docker("image", "inspect", BACKEND_IMAGE).returncode != 0:
        missing(f"no image {BACKEND_IMAGE}", "build it with `make image`")
    monkeypatch.delenv(IMAGE_ENV, raising=False)  # this test runs our peer, the README's way
    client = shared_client()
    ours = client.images.get(ensure_image(client).tag)
    try:
        previous = client.images.get(README_PEER_IMAGE)
    except ImageNotFound:
        previous = None
    repository, tag = README_PEER_IMAGE.split(":")
    ours.tag(repository, tag)
    try:
        yield README_PEER_IMAGE
    finally:
        if previous is None:
            with contextlib.suppress(APIError):
                client.images.remove(README_PEER_IMAGE, noprune=True)
        elif previous.id != ours.id:
            previous.tag(repository, tag)  # `make demo`'s image, as it was


def test_the_readme_compose_command_brings_both_services_up_healthy_and_spans_drain(
    compose_cli: list[str], repo_root: Path, tmp_path: Path, readme_peer_image: str
) -> None:
    http_port, otlp_port = free_ports(2)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        **({"DOCKER_HOST": os.environ["DOCKER_HOST"]} if "DOCKER_HOST" in os.environ else {}),
        # The README's command ...
        "INGESTION_IMAGE": readme_peer_image,
        "INGESTION_HEALTH_PROBE": "/ingestion-peer",
        # ... on host ports that are free here, with the image under test.
        "JUNJO_HTTP_PORT": str(http_port),
        "INGESTION_OTLP_PORT": str(otlp_port),
        "JUNJO_BACKEND_IMAGE": BACKEND_IMAGE,
    }
    project = Project(compose_cli, repo_root, tmp_path, env)
    try:
        up = project.run("up", "-d", "--no-build")
        assert up.returncode == 0, up.stderr + project.logs()
        try:
            wait_until_sync(
                lambda: project.health("backend") == project.health("ingestion") == "healthy",
                "both services healthy",
                limit=HEALTHY_WITHIN,
                every=1.0,
            )
        except NeverHappenedError:
            states = {service: project.health(service) for service in ("backend", "ingestion")}
            pytest.fail(f"not both healthy: {states}\n{project.logs()}")
        for service in ("backend", "ingestion"):
            assert project.networks(service) == {project.network}

        created = project.run(
            "exec", "-T", "backend", "junjo-backend", "api-keys", "create", "compose-test"
        )
        key = _CREATED_KEY.search(created.stdout)
        assert created.returncode == 0, created.stderr
        assert key is not None, "api-keys create printed no key"
        sent = subprocess.run(
            [
                str(go_tool("otlpload")),
                "-addr",
                f"127.0.0.1:{otlp_port}",
                "-streams",
                "2",
                "-batch",
                "100",
                "-spans",
                str(SPANS),
            ],
            env={**env, "OTLPLOAD_API_KEY": key.group(1)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        report = json.loads(sent.stdout)
        assert report["spans_accepted"] == SPANS, report

        def processed() -> int:
            body = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).json()
            return int(body["poller"]["spans_processed"])

        with contextlib.suppress(NeverHappenedError):
            wait_until_sync(lambda: processed() >= SPANS, "spans drained", limit=DRAINED_WITHIN)
        assert processed() == SPANS, project.logs()
        health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
        assert health.status_code == 200
        assert health.json()["ingestion"]["reachable"] is True
    finally:
        project.down()
    assert project.leftovers() == []
