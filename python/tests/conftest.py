"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's top folder (holds buf.yaml, proto/, python/, go-compat-tests/)."""
    return REPO_ROOT
