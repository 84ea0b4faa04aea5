"""Where PostgreSQL's server binaries are, and what a run without them does.

Debian and Ubuntu install them under /usr/lib/postgresql/<version>/bin, off PATH, with
`pg_config` (on PATH) naming that folder; other systems put them on PATH. So: PATH first,
then `pg_config --bindir`, any version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest


def find_pg_tool(name: str, path: str | None = None) -> str | None:
    """The executable `name` on `path` (default: PATH), else in pg_config's bindir."""
    found = shutil.which(name, path=path)
    if found:
        return found
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is None:
        return None
    try:
        bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    candidate = Path(bindir) / name
    return str(candidate) if bindir and os.access(candidate, os.X_OK) else None


def in_ci() -> bool:
    """Whether this run is CI's (`CI=true`, as GitHub Actions and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing_postgres(reason: str) -> NoReturn:
    """Skip the PostgreSQL tests; under CI=true fail instead, since CI must test PostgreSQL."""
    if in_ci():
        pytest.fail(
            f"{reason}. CI=true: PostgreSQL support must be tested, not skipped "
            "(install it: apt-get install -y postgresql).",
            pytrace=False,
        )
    pytest.skip(reason)
