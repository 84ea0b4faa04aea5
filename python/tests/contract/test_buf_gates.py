"""The buf gates bite: a wire break fails `make breaking-go`, a lint violation `buf lint`.

Each case edits a temporary copy of proto/ (and buf.yaml) and runs the same gate CI runs.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

INGESTION = "proto/junjo_backend/_wire/ingestion/ingestion.proto"


def _copy_contract(repo_root: Path, dest: Path) -> Path:
    shutil.copytree(repo_root / "proto", dest / "proto")
    shutil.copy(repo_root / "buf.yaml", dest / "buf.yaml")
    return dest


def _edit(root: Path, relative: str, old: str, new: str) -> None:
    path = root / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new))


def _breaking_go(repo_root: Path, proto_root: Path) -> subprocess.CompletedProcess[str]:
    # The gate's own recipe, but `-o setup-python`: a test must not re-run `uv sync` on the
    # environment it runs in.
    command = ["make", "-s", "-o", "setup-python", "-C", str(repo_root), "breaking-go"]
    return subprocess.run(
        [*command, f"PROTO_ROOT={proto_root}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_an_unchanged_copy_passes_the_go_gate(repo_root: Path, tmp_path: Path) -> None:
    root = _copy_contract(repo_root, tmp_path)
    result = _breaking_go(repo_root, root)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("relative", "old", "new", "complaint"),
    [
        pytest.param(
            INGESTION,
            "uint32 batch_size = 2;",
            "uint32 batch_size = 4;",
            'Previously present field "2" with name "batch_size"',
            id="renumbered-field",
        ),
        pytest.param(
            INGESTION,
            "package ingestion;",
            "package ingestion.v1;",
            "Previously present service",
            id="renamed-package",
        ),
        pytest.param(
            INGESTION,
            "returns (stream ReadSpansResponse)",
            "returns (ReadSpansResponse)",
            "server streaming",
            id="stream-made-unary",
        ),
        pytest.param(
            "proto/junjo_backend/_wire/ingestion/auth.proto",
            "bool is_valid = 1;",
            "bool valid = 1;",
            'changed name from "is_valid" to "valid"',
            id="renamed-field",
        ),
    ],
)
def test_a_wire_break_fails_the_go_gate(
    repo_root: Path, tmp_path: Path, *, relative: str, old: str, new: str, complaint: str
) -> None:
    root = _copy_contract(repo_root, tmp_path)
    _edit(root, relative, old, new)
    result = _breaking_go(repo_root, root)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def _buf_lint(repo_root: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repo_root / "python" / ".venv" / "bin" / "buf"), "lint"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_buf_lint_passes_on_our_tree_and_fails_on_an_unjustified_violation(
    repo_root: Path, tmp_path: Path
) -> None:
    root = _copy_contract(repo_root, tmp_path)
    clean = _buf_lint(repo_root, root)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _edit(
        root,
        INGESTION,
        "message ReadSpansRequest {",
        "message read_spans_extra {\n  bytes Payload = 1;\n}\n\nmessage ReadSpansRequest {",
    )
    dirty = _buf_lint(repo_root, root)
    assert dirty.returncode != 0
    assert "read_spans_extra" in dirty.stdout
    assert "Payload" in dirty.stdout


def test_every_lint_exception_is_needed(repo_root: Path, tmp_path: Path) -> None:
    # Dropping any excepted rule must make lint fail: an exception nobody needs is a hole.
    root = _copy_contract(repo_root, tmp_path)
    config = (root / "buf.yaml").read_text()
    lint_except = config.split("  except:\n", 1)[1].split("breaking:", 1)[0]
    excepted = [line.strip()[2:] for line in lint_except.splitlines() if line.startswith("    - ")]
    assert excepted, "buf.yaml lists no lint exceptions"
    for rule in excepted:
        (root / "buf.yaml").write_text(config.replace(f"    - {rule}\n", ""))
        result = _buf_lint(repo_root, root)
        assert result.returncode != 0, f"{rule} is excepted but nothing violates it"
