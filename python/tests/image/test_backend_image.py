"""The backend image `make image` builds: what it runs, as whom, and its HEALTHCHECK.

`make test` builds the image before pytest runs; alone, build it with `make image`
(JUNJO_BACKEND_IMAGE names another tag). Every container started here is removed with its
anonymous /data volume; no image is built or tagged.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import TYPE_CHECKING

import pytest

from harness.waiting import free_port, wait_until_sync
from junjo_backend import __version__
from tests.image.image_helpers import BACKEND_IMAGE, docker, missing

if TYPE_CHECKING:
    from collections.abc import Iterator

START_TIMEOUT_SECONDS = 60.0
# Every container these tests start carries it, so a sweep finds what a crash left.
LABEL = f"org.junjo-backend.image-test={uuid.uuid4().hex}"
CONTAINER_SETTINGS = {
    "AUTH_GRPC_LISTEN_ADDRESS": "0.0.0.0:50053",
    "HTTP_HOST": "0.0.0.0",  # noqa: S104 (a container's binding is the point)
    "INGESTION_GRPC_ADDRESS": "junjo-server-ingestion:50052",
    "DATABASE_URL": "sqlite+aiosqlite:////data/junjo.db",
}


@pytest.fixture(scope="module")
def image_config() -> dict[str, object]:
    """The image's configuration (`docker image inspect`); skips when there is no image."""
    if docker("info").returncode != 0:
        missing("no Docker engine answered `docker info`", "start dockerd")
    inspected = docker("image", "inspect", BACKEND_IMAGE)
    if inspected.returncode != 0:
        missing(f"no image {BACKEND_IMAGE}", "build it with `make image`")
    config: dict[str, object] = json.loads(inspected.stdout)[0]["Config"]
    return config


@pytest.fixture(scope="module", autouse=True)
def remove_left_containers() -> Iterator[None]:
    """Remove, with their volumes, any container of this module still there at its end."""
    yield
    listed = docker("ps", "-aq", "--filter", f"label={LABEL}")
    for container in listed.stdout.split():
        docker("rm", "-f", "-v", container)


def test_the_image_runs_the_cli_of_this_version(image_config: dict[str, object]) -> None:
    assert image_config["Entrypoint"] == ["junjo-backend"]
    assert image_config["Cmd"] == ["serve"]
    result = docker("run", "--rm", "--label", LABEL, BACKEND_IMAGE, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"junjo-backend {__version__}"


def test_the_image_sets_the_container_bindings_and_runs_as_non_root(
    image_config: dict[str, object],
) -> None:
    items = image_config["Env"]
    assert isinstance(items, list)
    env = dict(str(item).split("=", 1) for item in items)
    for name, value in CONTAINER_SETTINGS.items():
        assert env.get(name) == value, name
    assert image_config["User"] == "junjo"
    who = docker("run", "--rm", "--label", LABEL, "--entrypoint", "id", BACKEND_IMAGE, "-u")
    assert who.returncode == 0, who.stderr
    assert who.stdout.strip() not in {"", "0"}


def test_the_image_carries_the_generated_code_and_the_postgres_driver(
    image_config: dict[str, object],
) -> None:
    assert image_config["Entrypoint"]  # the image exists
    probe = (
        "import asyncpg, junjo_backend._wire.ingestion.auth_pb2_grpc as stubs; "
        "print(stubs.__file__)"
    )
    result = docker(
        "run", "--rm", "--label", LABEL, "--entrypoint", "python3", BACKEND_IMAGE, "-c", probe
    )
    assert result.returncode == 0, result.stderr
    # Installed as a package, not run from a source tree.
    assert "/site-packages/junjo_backend/_wire/" in result.stdout


def test_the_healthcheck_passes_once_the_backend_serves_and_fails_when_nothing_answers(
    image_config: dict[str, object],
) -> None:
    healthcheck = image_config["Healthcheck"]
    assert isinstance(healthcheck, dict)
    kind, *command = healthcheck["Test"]
    assert kind == "CMD"
    http_port = free_port()
    name = f"junjo-image-test-{os.getpid()}-{http_port}"
    started = docker(
        "run", "-d", "--name", name, "--label", LABEL, "--network", "host",
        "-e", f"HTTP_PORT={http_port}", "-e", "HTTP_HOST=127.0.0.1",
        "-e", f"AUTH_GRPC_LISTEN_ADDRESS=127.0.0.1:{free_port()}",
        "-e", "POLLER_ENABLED=false",
        BACKEND_IMAGE,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:

        def healthy() -> bool:
            if docker("exec", name, *command).returncode == 0:
                return True
            running = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert running == "true", docker("logs", name).stderr
            return False

        wait_until_sync(healthy, "the image's health check passes", limit=START_TIMEOUT_SECONDS)
        # The non-root user wrote the SQLite file on the /data volume.
        assert docker("exec", name, "test", "-s", "/data/junjo.db").returncode == 0
        # The same check against a port nothing listens on fails.
        refused = docker("exec", "-e", f"HTTP_PORT={free_port()}", name, *command)
        assert refused.returncode != 0
        assert "Connection refused" in refused.stderr
        stopped = docker("stop", "-t", "20", name)
        assert stopped.returncode == 0, stopped.stderr
        exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert exit_code == "0", docker("logs", name).stderr
    finally:
        docker("rm", "-f", "-v", name)
