"""compose.yaml: a compose implementation accepts it, it says what the deployment needs,
and a broken key makes the check fail.

The compose CLI is Debian's `docker-compose` (bookworm's 1.29, `apt-get install
docker-compose`; .ci/run installs it), whose normalised output the checks below read.
`config` only reads and normalises the file: nothing is pulled, built or started. The
file's variables come from the test alone (an empty env file, a clean environment), so a
developer's .env cannot change the outcome.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from harness.peer import PUBLISHED_IMAGE, PUBLISHED_IMAGE_REPOSITORY, PUBLISHED_RELEASE
from tests.image.image_helpers import DOCKER_TIMEOUT_SECONDS, missing

if TYPE_CHECKING:
    from pathlib import Path

PUBLISHED_INGESTION_IMAGE = PUBLISHED_IMAGE
LOCAL_PEER_IMAGE = "junjo-ingestion-peer:demo"


def compose_config(
    cli: list[str],
    compose_file: Path | list[Path],
    project_dir: Path,
    tmp_path: Path,
    variables: dict[str, str] | None = None,
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """`config` of `compose_file` (several: each on top of the one before), relative paths
    resolved from `project_dir`, with no variables but `variables`."""
    files = compose_file if isinstance(compose_file, list) else [compose_file]
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **(variables or {})}
    return subprocess.run(
        [
            *cli,
            "--env-file",
            str(env_file),
            "--project-directory",
            str(project_dir),
            *(argument for path in files for argument in ("-f", str(path))),
            "config",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=DOCKER_TIMEOUT_SECONDS,
        check=False,
        env=env,
    )


def service_block(normalised: str, service: str) -> str:
    """The lines of one service in compose's normalised output (two-space indented keys)."""
    match = re.search(
        rf"^  {re.escape(service)}:\n((?:    .*\n|  - .*\n)*)", normalised, flags=re.MULTILINE
    )
    assert match is not None, f"no service {service} in:\n{normalised}"
    return match.group(1)


def test_compose_accepts_the_file_and_it_wires_both_services(
    compose_cli: list[str], repo_root: Path, tmp_path: Path
) -> None:
    compose_file = repo_root / "compose.yaml"
    services = compose_config(compose_cli, compose_file, repo_root, tmp_path, {}, "--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {"backend", "ingestion"}
    volumes = compose_config(compose_cli, compose_file, repo_root, tmp_path, {}, "--volumes")
    assert set(volumes.stdout.split()) == {"backend-data", "ingestion-wal"}

    result = compose_config(compose_cli, compose_file, repo_root, tmp_path)
    assert result.returncode == 0, result.stderr
    backend = service_block(result.stdout, "backend")
    assert "image: junjo-backend:local" in backend
    assert "- junjo-server-backend" in backend  # the name the ingestion-service dials
    assert "INGESTION_GRPC_ADDRESS: junjo-server-ingestion:50052" in backend
    assert re.search(r"- backend-data:/data(:rw)?\n", backend)
    assert "healthcheck:" in backend
    assert "/ping" in backend
    ingestion = service_block(result.stdout, "ingestion")
    assert f"image: {PUBLISHED_INGESTION_IMAGE}" in ingestion
    assert "- junjo-server-ingestion" in ingestion  # the name the backend dials
    assert "BADGERDB_PATH: /dbdata/badgerdb" in ingestion
    assert re.search(r"- ingestion-wal:/dbdata/badgerdb(:rw)?\n", ingestion)
    assert "condition: service_healthy" in ingestion
    assert "- grpc_health_probe\n      - -addr=127.0.0.1:50052" in ingestion


def test_every_mention_of_the_published_image_is_its_real_name(repo_root: Path) -> None:
    # Upstream publishes mdrideout/junjo-server-ingestion-service (issue 20: compose and
    # hosted CI named mdrideout/junjo-server-ingestion, which does not exist).
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    wrong = re.compile(r"mdrideout/junjo-server-ingestion(?!-service)")
    hits = [
        name
        for name in listed.stdout.splitlines()
        if (repo_root / name).is_file()
        and name != "python/tests/image/test_compose.py"  # this test spells the wrong name
        and wrong.search((repo_root / name).read_bytes().decode("utf-8", "replace"))
    ]
    assert hits == []
    # Hosted CI: the pinned release on pushes and pull requests, `latest` every week.
    ci = (repo_root / ".github" / "workflows" / "ci.yml").read_text()
    pinned = (
        f"JUNJO_COMPAT_INGESTION_IMAGE: {PUBLISHED_IMAGE_REPOSITORY}:${{{{ github.event_name "
        f"== 'schedule' && 'latest' || '{PUBLISHED_RELEASE}' }}}}"
    )
    assert pinned in ci


def test_the_local_peer_image_and_its_probe_come_in_through_variables(
    compose_cli: list[str], repo_root: Path, tmp_path: Path
) -> None:
    variables = {"INGESTION_IMAGE": LOCAL_PEER_IMAGE, "INGESTION_HEALTH_PROBE": "/ingestion-peer"}
    result = compose_config(compose_cli, repo_root / "compose.yaml", repo_root, tmp_path, variables)
    assert result.returncode == 0, result.stderr
    ingestion = service_block(result.stdout, "ingestion")
    assert f"image: {LOCAL_PEER_IMAGE}" in ingestion
    assert "- /ingestion-peer\n      - -addr=127.0.0.1:50052" in ingestion


def test_the_peer_binary_understands_the_compose_health_check(
    repo_root: Path, tmp_path: Path
) -> None:
    # The probe's own flag, not the server's: it answers at once, whatever listens there.
    binary = repo_root / "go-compat-tests" / "bin" / "ingestion-peer"
    if not binary.exists():
        missing(f"{binary.name} is not built", "make peer")
    probe = subprocess.run(
        [str(binary), "-addr=127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert probe.returncode == 1, probe.stderr
    assert probe.stderr.startswith("healthcheck: "), probe.stderr


@pytest.mark.parametrize(
    "mutation",
    [
        ("    healthcheck:\n", "    healthchek:\n", "healthchek"),
        ("\nvolumes:\n", "\nvolumez:\n", "volumez"),
        ("      retries: 3\n", "      retries: three\n", "three"),
    ],
    ids=["service-key", "top-level-key", "value-type"],
)
def test_a_broken_compose_file_fails_the_check(
    compose_cli: list[str], repo_root: Path, tmp_path: Path, mutation: tuple[str, str, str]
) -> None:
    original, broken, named = mutation
    text = (repo_root / "compose.yaml").read_text()
    assert original in text
    intact = tmp_path / "intact.yaml"
    intact.write_text(text)
    assert compose_config(compose_cli, intact, repo_root, tmp_path).returncode == 0
    mutated = tmp_path / "compose.yaml"
    mutated.write_text(text.replace(original, broken, 1))
    result = compose_config(compose_cli, mutated, repo_root, tmp_path)
    assert result.returncode != 0, result.stdout
    assert named in result.stderr  # rejected for the mutation, not for something else
