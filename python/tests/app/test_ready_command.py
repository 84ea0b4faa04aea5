"""The ready line's "create an API key with: ..." works where the server was started.

After `make run` (`uv run --project python junjo-backend serve` from the repository's top)
the command is not on the shell's PATH, so the hint is `uv run --project python
junjo-backend ...`; in the image (the environment's bin on PATH) it is `junjo-backend`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from junjo_backend.invocation import cli_command
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.timeout(120)

_HERE_BIN = Path(sys.prefix) / "bin"
_SERVE_ENV = {"POLLER_ENABLED": "false", "LOG_FORMAT": "json"}  # on ServeProcess's defaults


def _shell_env() -> dict[str, str]:
    """Our environment as a shell outside uv would have it (no uv markers, our bin off PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in {"UV", "VIRTUAL_ENV"}}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != _HERE_BIN]
    env["PATH"] = os.pathsep.join(path)
    return env


def _ready_hint(process: ServeProcess) -> str:
    try:
        ready = process.wait_for("junjo-backend ready")
    finally:
        # SIGTERM, which uv passes on to its child (SIGKILL would leave the child running).
        process.signal(signal.SIGTERM)
    assert process.wait() == 0
    return str(ready["msg"]).split("create an API key with: ", 1)[1]


def test_started_by_uv_run_from_the_top_the_hint_is_uv_run_project(
    repo_root: Path, tmp_path: Path
) -> None:
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    command = (uv, "run", "--project", "python", "--locked", "--no-sync", "junjo-backend")
    env = {**_SERVE_ENV, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'junjo.db'}"}
    process = ServeProcess(
        env,
        cwd=repo_root,
        output=tmp_path / "serve.log",
        command=(*command, "serve"),
        environ=_shell_env(),
    ).start()
    assert _ready_hint(process) == "uv run --project python junjo-backend api-keys create NAME"


def test_the_command_on_path_is_named_as_it_is(tmp_path: Path) -> None:
    """As in the image: the environment's bin on PATH, `junjo-backend` as the entry point."""
    env = _shell_env()
    env["PATH"] = os.pathsep.join([str(_HERE_BIN), env["PATH"]])
    serve_env = {**_SERVE_ENV, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'junjo.db'}"}
    process = ServeProcess(
        serve_env,
        cwd=tmp_path,
        output=tmp_path / "serve.log",
        command=(str(_HERE_BIN / "junjo-backend"), "serve"),
        environ=env,
    ).start()
    assert _ready_hint(process) == "junjo-backend api-keys create NAME"


def test_otherwise_the_hint_is_this_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _shell_env()
    assert cli_command(env) == f"{sys.executable} -m junjo_backend"
    uv_env = {**env, "UV": "uv", "VIRTUAL_ENV": sys.prefix}
    project = Path(sys.prefix).resolve().parent
    monkeypatch.chdir(project)
    assert cli_command(uv_env) == "uv run junjo-backend"
    monkeypatch.chdir(tmp_path)  # outside the project: its absolute path
    assert cli_command(uv_env) == f"uv run --project {project} junjo-backend"
    # Another environment's VIRTUAL_ENV is not ours: not a uv run of this project.
    assert cli_command({**uv_env, "VIRTUAL_ENV": str(tmp_path)}) == cli_command(env)
