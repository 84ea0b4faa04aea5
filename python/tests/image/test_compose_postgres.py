"""compose.postgres.yaml: the PostgreSQL variant of compose.yaml, for several backend replicas.

Checked as compose.yaml is (tests/image/test_compose.py): Debian's docker-compose `config`
reads and normalises the two files together; nothing is pulled or started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.image.test_compose import compose_config, service_block

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path


def _config(
    cli: list[str], repo_root: Path, tmp_path: Path, variables: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """`config` of compose.yaml with compose.postgres.yaml on top."""
    files = [repo_root / "compose.yaml", repo_root / "compose.postgres.yaml"]
    return compose_config(cli, files, repo_root, tmp_path, variables, *extra)


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
