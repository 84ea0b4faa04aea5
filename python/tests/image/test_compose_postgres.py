"""compose.postgres.yaml: the PostgreSQL variant of compose.yaml, for several backend replicas.

Checked as compose.yaml is (tests/image/test_compose.py): Debian's docker-compose `config`
reads and normalises the two files together; nothing is pulled or started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.image.image_helpers import DOCKER_TIMEOUT_SECONDS, missing
from tests.image.test_compose import service_block

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """Debian's docker-compose, as for compose.yaml."""
    standalone = shutil.which("docker-compose")
    if standalone is None:
        missing("docker-compose is not on PATH", "apt-get install -y docker-compose")
    return [standalone]


def _config(
    cli: list[str], repo_root: Path, tmp_path: Path, variables: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """`config` of compose.yaml with compose.postgres.yaml on top; variables from the test only."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [
            *cli,
            "--env-file",
            str(env_file),
            "--project-directory",
            str(repo_root),
            "-f",
            str(repo_root / "compose.yaml"),
            "-f",
            str(repo_root / "compose.postgres.yaml"),
            "config",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=DOCKER_TIMEOUT_SECONDS,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables},
    )


def test_the_postgres_variant_puts_every_replica_on_one_postgresql(
    compose_cli: list[str], repo_root: Path, tmp_path: Path
) -> None:
    variables = {"POSTGRES_PASSWORD": "replicas", "JUNJO_HTTP_PORT": "1323-1325"}
    services = _config(compose_cli, repo_root, tmp_path, variables, "--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {"backend", "ingestion", "postgres"}
    volumes = _config(compose_cli, repo_root, tmp_path, variables, "--volumes")
    assert "postgres-data" in volumes.stdout.split()

    result = _config(compose_cli, repo_root, tmp_path, variables)
    assert result.returncode == 0, result.stderr
    backend = service_block(result.stdout, "backend")
    assert "DATABASE_URL: postgresql+asyncpg://junjo:replicas@postgres:5432/junjo" in backend
    assert "      postgres:\n        condition: service_healthy" in backend
    # A host port range: each scaled replica publishes its HTTP API on one of them.
    assert "127.0.0.1:1323-1325:1323" in backend
    postgres = service_block(result.stdout, "postgres")
    assert "POSTGRES_PASSWORD: replicas" in postgres
    assert "pg_isready" in postgres
    assert "- junjo" in postgres  # on the backend's network


def test_the_postgres_variant_needs_a_password(
    compose_cli: list[str], repo_root: Path, tmp_path: Path
) -> None:
    result = _config(compose_cli, repo_root, tmp_path, {})
    assert result.returncode != 0, result.stdout
    assert "POSTGRES_PASSWORD" in result.stderr
