"""How to run `junjo-backend` again from the shell this process was started in.

The hints the backend prints (the ready line's "create an API key with: ...") must work
when pasted. After `make run` the command is not on the shell's PATH: `uv run` put the
project's environment there for the server only. So the hint follows how this process was
started:

- through `uv run` (it sets `UV` and `VIRTUAL_ENV` for its child): `uv run --project DIR
  junjo-backend`, DIR the project that owns the environment, relative to the working folder
  (where the server was started, and where its relative paths point);
- as the `junjo-backend` on PATH, from this environment (the image): `junjo-backend`;
- otherwise (`python -m junjo_backend`, a script not on PATH): this interpreter with `-m`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

COMMAND = "junjo-backend"


def _uv_project(environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """The uv project whose environment runs this process, when `uv run` started it."""
    venv = environ.get("VIRTUAL_ENV")
    if not environ.get("UV") or not venv or Path(venv).resolve() != Path(sys.prefix).resolve():
        return None
    project = Path(sys.prefix).resolve().parent
    return project if (project / "pyproject.toml").is_file() else None


def _on_path_here(environ: dict[str, str] | os._Environ[str]) -> bool:
    """Whether PATH's `junjo-backend` is this environment's."""
    found = shutil.which(COMMAND, path=environ.get("PATH"))
    if found is None:
        return False
    return Path(found).resolve().parent == (Path(sys.prefix) / "bin").resolve()


def cli_command(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """The shell words that run `junjo-backend` where this process was started."""
    project = _uv_project(environ)
    if project is not None:
        where = os.path.relpath(project, Path.cwd())
        if where == ".":
            return f"uv run {COMMAND}"
        if where.startswith(".."):
            where = str(project)
        return f"uv run --project {shlex.quote(where)} {COMMAND}"
    if _on_path_here(environ):
        return COMMAND
    return f"{shlex.quote(sys.executable)} -m junjo_backend"
