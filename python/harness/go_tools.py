"""The Go programs of go-compat-tests (the peer, walseed, otlpload, authload...), built here."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

GO_MODULE = Path(__file__).resolve().parents[2] / "go-compat-tests"
# Where `make peer` puts them.
GO_BIN = GO_MODULE / "bin"
_BUILD_TIMEOUT_SECONDS = 600


class GoBuildError(Exception):
    """`go` is missing or `go build` failed; the message carries Go's output."""


def go_build(name: str, output: Path) -> Path:
    """`go build` of the static binary ./cmd/`name` to the file `output`; `output`."""
    go = shutil.which("go")
    if go is None:
        raise GoBuildError(f"the `go` toolchain is not on PATH: it builds {name}")
    build = subprocess.run(
        [go, "build", "-trimpath", "-o", str(output), f"./cmd/{name}"],
        cwd=GO_MODULE,
        env={**os.environ, "CGO_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=_BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if build.returncode != 0:
        raise GoBuildError(f"go build of {name} failed:\n{build.stderr}")
    return output


@functools.cache
def go_tool(name: str, *, rebuild: bool = False) -> Path:
    """go-compat-tests/bin/`name`, built unless `make peer` has built it.

    With `rebuild`, built anyway, once a process (Go's build cache makes an unchanged tool
    quick), so that a scenario never runs a tool older than its sources.
    """
    binary = GO_BIN / name
    if rebuild or not binary.exists():
        GO_BIN.mkdir(exist_ok=True)
        go_build(name, binary)
    return binary
