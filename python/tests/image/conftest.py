"""Fixtures of the image and compose tests."""

from __future__ import annotations

import shutil

import pytest

from tests.image.image_helpers import missing


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """Debian's docker-compose: the implementation this file is checked with."""
    standalone = shutil.which("docker-compose")
    if standalone is None:
        missing("docker-compose is not on PATH", "apt-get install -y docker-compose")
    return [standalone]
