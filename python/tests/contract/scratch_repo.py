"""A throwaway git repository holding what `make gen` reads and writes, for gate tests.

The gates compare with git (what is committed), so each test gets its own small
repository: the Makefile, the buf configuration and templates, proto/, go-contract/, the
committed generated code, and the project's environment linked in (the templates run
their plugins from python/.venv). Targets run with the setup steps marked done: a test
must not re-run `uv sync` on the environment it runs in, nor ask a registry for Go modules.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

INGESTION = "proto/junjo_backend/_wire/ingestion/ingestion.proto"
PY_WIRE = "python/src/junjo_backend/_wire"
GO_WIRE = "go-compat-tests/internal/wire"
_COPIED = (
    "Makefile",
    "buf.yaml",
    "buf.gen.yaml",
    "contract-snapshot.binpb",
    "proto",
    "python/tools/protoc_gen_grpc_python.py",
    PY_WIRE,
    "go-compat-tests/go.mod",
    "go-compat-tests/go.sum",
    "go-compat-tests/buf.gen.yaml",
    "go-compat-tests/go-contract",
    GO_WIRE,
)
_MAKE_TIMEOUT_SECONDS = 300


@dataclass(frozen=True, slots=True)
class ScratchRepo:
    """A committed copy of the code-generation inputs and outputs."""

    root: Path
    real_root: Path

    def make(self, *targets: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """Run make targets here, setup marked done, buf from the real environment."""
        buf = self.real_root / "python" / ".venv" / "bin" / "buf"
        command = ["make", "-s", "-o", "setup", "-o", "setup-python", "-o", "setup-go"]
        command += ["-C", str(self.root), *targets, f"BUF={buf}"]
        command += [f"{name}={value}" for name, value in variables.items()]
        return subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=_MAKE_TIMEOUT_SECONDS
        )

    def edit(self, relative: str, old: str, new: str) -> None:
        """Replace `old` (which must be there) by `new` in one file."""
        path = self.root / relative
        text = path.read_text()
        assert old in text, f"{old!r} not in {relative}"
        path.write_text(text.replace(old, new))

    def git(self, *args: str) -> str:
        """Run git here; its stdout."""
        return subprocess.run(
            ["git", "-C", str(self.root), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    def commit_all(self, message: str) -> None:
        """Commit every change, new files included."""
        self.git("add", "-A")
        self.git(
            "-c", "user.name=gate test", "-c", "user.email=gate@test", "commit", "-qm", message
        )

    def changed(self, path: str) -> str:
        """`git status --porcelain` of `path`: empty when it is as committed."""
        return self.git("status", "--porcelain", "--untracked-files=all", "--", path)


def scratch_repo(real_root: Path, dest: Path) -> ScratchRepo:
    """Copy the generation inputs and the committed outputs into `dest` and commit them."""
    for relative in _COPIED:
        source = real_root / relative
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    (dest / "python" / ".venv").symlink_to(real_root / "python" / ".venv")
    (dest / ".gitignore").write_text(".venv\n__pycache__/\n")
    repo = ScratchRepo(dest, real_root)
    repo.git("init", "-q", "-b", "main")
    repo.commit_all("the committed state")
    return repo
