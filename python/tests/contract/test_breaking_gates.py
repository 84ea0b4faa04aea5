"""breaking-main, the live-upstream gate and actionlint bite.

Each case runs the real target on a mutated copy: proto/ against the committed contract
snapshot or a git base, a local folder standing in for the live Go repository, a broken
copy of the hosted workflow.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

INGESTION = "proto/junjo_backend/_wire/ingestion/ingestion.proto"
RENUMBERED = ("uint32 batch_size = 2;", "uint32 batch_size = 4;")
RENUMBERED_COMPLAINT = 'Previously present field "2" with name "batch_size"'


def _make(repo_root: Path, target: str, **variables: str) -> subprocess.CompletedProcess[str]:
    # Setup marked done: a test must not re-run `uv sync` or reach a Go module registry.
    command = ["make", "-s", "-o", "setup-python", "-o", "setup-go", "-C", str(repo_root)]
    command += [target, *(f"{name}={value}" for name, value in variables.items())]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)


def _copy_contract(repo_root: Path, dest: Path) -> Path:
    shutil.copytree(repo_root / "proto", dest / "proto")
    shutil.copy(repo_root / "buf.yaml", dest / "buf.yaml")
    return dest


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


# --- breaking-main -------------------------------------------------------------------------


def test_breaking_main_passes_on_the_released_contract(repo_root: Path, tmp_path: Path) -> None:
    root = _copy_contract(repo_root, tmp_path / "copy")
    result = _make(repo_root, "breaking-main", PROTO_ROOT=str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compatible with the released contract" in result.stdout


def test_breaking_main_fails_on_a_renumbered_field(repo_root: Path, tmp_path: Path) -> None:
    root = _copy_contract(repo_root, tmp_path / "copy")
    _edit(root / INGESTION, *RENUMBERED)
    result = _make(repo_root, "breaking-main", PROTO_ROOT=str(root))
    assert result.returncode != 0
    assert RENUMBERED_COMPLAINT in result.stdout + result.stderr


def test_breaking_main_without_a_baseline_fails_and_says_so(
    repo_root: Path, tmp_path: Path
) -> None:
    result = _make(repo_root, "breaking-main", CONTRACT_SNAPSHOT=str(tmp_path / "gone.binpb"))
    assert result.returncode != 0
    assert "breaking-main: no baseline" in result.stderr
    assert "make contract-snapshot" in result.stderr


def test_breaking_main_compares_with_the_given_base_too(repo_root: Path, tmp_path: Path) -> None:
    # The snapshot is refreshed from the broken tree (so it alone would pass); the pull
    # request's base, a git ref, still catches the break.
    root = _copy_contract(repo_root, tmp_path / "copy")
    git = ["git", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=60)
    subprocess.run([*git, "add", "-A"], check=True, timeout=60)
    subprocess.run(
        [*git, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
        check=True,
        timeout=60,
    )
    base = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    _edit(root / INGESTION, *RENUMBERED)
    snapshot = tmp_path / "broken.binpb"
    made = _make(
        repo_root, "contract-snapshot", PROTO_ROOT=str(root), CONTRACT_SNAPSHOT=str(snapshot)
    )
    assert made.returncode == 0, made.stdout + made.stderr
    alone = _make(repo_root, "breaking-main", PROTO_ROOT=str(root), CONTRACT_SNAPSHOT=str(snapshot))
    assert alone.returncode == 0, alone.stdout + alone.stderr
    with_base = _make(
        repo_root,
        "breaking-main",
        PROTO_ROOT=str(root),
        CONTRACT_SNAPSHOT=str(snapshot),
        BREAKING_BASE=base,
    )
    assert with_base.returncode != 0
    assert RENUMBERED_COMPLAINT in with_base.stdout + with_base.stderr


# --- breaking-go-live, against a local folder standing in for the Go repository -------------


def _upstream(repo_root: Path, tmp_path: Path) -> Path:
    upstream = tmp_path / "upstream"
    shutil.copytree(repo_root / "go-compat-tests" / "go-contract", upstream)
    # Upstream holds more protos than the contract; they must not matter.
    (upstream / "workflow_log.proto").write_text('syntax = "proto3";\n\npackage other;\n')
    return upstream


def test_the_live_gate_passes_when_upstream_matches_the_pin(
    repo_root: Path, tmp_path: Path
) -> None:
    result = _make(
        repo_root, "breaking-go-live", GO_LIVE_CONTRACT=str(_upstream(repo_root, tmp_path))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "matches the pin" in result.stdout


def test_the_live_gate_fails_on_an_upstream_break_and_shows_the_diff(
    repo_root: Path, tmp_path: Path
) -> None:
    upstream = _upstream(repo_root, tmp_path)
    _edit(upstream / "ingestion.proto", *RENUMBERED)
    result = _make(repo_root, "breaking-go-live", GO_LIVE_CONTRACT=str(upstream))
    assert result.returncode != 0
    # Upstream is the baseline here: its field 4 is what our proto/ lacks.
    assert 'Previously present field "4" with name "batch_size"' in result.stderr
    assert "What changed upstream since go-compat-tests/go-contract/ was pinned" in result.stderr
    assert "+++ upstream/ingestion.proto" in result.stderr
    assert "-  uint32 batch_size = 2;" in result.stderr
    assert "+  uint32 batch_size = 4;" in result.stderr


def test_the_live_gate_fails_when_a_contract_file_is_gone_upstream(
    repo_root: Path, tmp_path: Path
) -> None:
    upstream = _upstream(repo_root, tmp_path)
    (upstream / "auth.proto").unlink()
    result = _make(repo_root, "breaking-go-live", GO_LIVE_CONTRACT=str(upstream))
    assert result.returncode != 0
    assert "auth.proto no longer upstream" in result.stderr
    assert "-  bool is_valid = 1;" in result.stderr


def test_the_live_gate_fails_when_upstream_cannot_be_read(repo_root: Path, tmp_path: Path) -> None:
    result = _make(repo_root, "breaking-go-live", GO_LIVE_CONTRACT=str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "could not read the upstream protos" in result.stderr


# --- actionlint ------------------------------------------------------------------------------


def test_the_hosted_workflows_pass_actionlint(repo_root: Path) -> None:
    result = _make(repo_root, "actionlint")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        pytest.param(
            "- name: uv.lock is current",
            "- name: uv.lock: is it current",
            "could not parse as YAML",
            id="unquoted-colon",
        ),
        pytest.param(
            "actions/checkout@v7", "actions/checkout@v2", "too old to run", id="outdated-action"
        ),
        pytest.param(
            "${{ matrix.python }}",
            "${{ matrix.pyhton }}",
            'property "pyhton" is not defined',
            id="unknown-matrix-key",
        ),
    ],
)
def test_actionlint_fails_on_a_broken_workflow(
    repo_root: Path, tmp_path: Path, *, old: str, new: str, complaint: str
) -> None:
    workflows = tmp_path / "workflows"
    shutil.copytree(repo_root / ".github" / "workflows", workflows)
    _edit(workflows / "ci.yml", old, new)
    result = _make(repo_root, "actionlint", WORKFLOWS=str(workflows))
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
