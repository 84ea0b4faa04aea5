"""What the image and compose tests share: the docker CLI, CI's rule for missing tools."""

from __future__ import annotations

import os
import subprocess
from typing import NoReturn

import pytest

BACKEND_IMAGE = os.environ.get("JUNJO_BACKEND_IMAGE", "junjo-backend:local")
DOCKER_TIMEOUT_SECONDS = 120


def in_ci() -> bool:
    """Whether this run is CI's (`CI=true`, as GitHub Actions and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str, remedy: str) -> NoReturn:
    """Skip; under CI=true fail instead, since CI must test the image and the compose file."""
    if in_ci():
        pytest.fail(
            f"{reason}. CI=true: this must be tested, not skipped ({remedy}).", pytrace=False
        )
    pytest.skip(f"{reason} ({remedy})")


def docker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One docker CLI command, output captured; the caller judges its status."""
    return subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=DOCKER_TIMEOUT_SECONDS,
        check=False,
        env=env,
    )
