"""Generated code is committed, `make gen-check` catches every drift, and the peer is independent.

Each case works in a scratch git repository (scratch_repo.py) and runs the real targets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from .scratch_repo import GO_WIRE, INGESTION, PY_WIRE, ScratchRepo, scratch_repo

if TYPE_CHECKING:
    from pathlib import Path

PEER_GO = f"{GO_WIRE}/ingestion/ingestion.pb.go"


def _repo(repo_root: Path, tmp_path: Path) -> ScratchRepo:
    return scratch_repo(repo_root, tmp_path / "repo")


def test_the_committed_code_is_what_make_gen_makes(repo_root: Path, tmp_path: Path) -> None:
    repo = _repo(repo_root, tmp_path)
    result = repo.make("gen-check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is what make gen makes" in result.stdout


def test_a_proto_edit_that_was_not_regenerated_fails_gen_check(
    repo_root: Path, tmp_path: Path
) -> None:
    repo = _repo(repo_root, tmp_path)
    repo.edit(INGESTION, "bytes start_key_ulid = 1;", "bytes start_key = 1;")
    repo.commit_all("a proto edit without make gen")
    result = repo.make("gen-check")
    assert result.returncode != 0
    assert "not what make gen makes" in result.stderr
    assert f"{PY_WIRE}/ingestion/ingestion_pb2.py" in result.stderr


def test_a_hand_edit_of_generated_code_fails_gen_check(repo_root: Path, tmp_path: Path) -> None:
    repo = _repo(repo_root, tmp_path)
    repo.edit(PEER_GO, "package ingestion", "package ingestion // edited by hand")
    repo.commit_all("a hand edit")
    result = repo.make("gen-check")
    assert result.returncode != 0
    assert PEER_GO in result.stderr


def test_a_new_generated_file_left_untracked_fails_gen_check(
    repo_root: Path, tmp_path: Path
) -> None:
    repo = _repo(repo_root, tmp_path)
    (repo.root / "proto/junjo_backend/_wire/ingestion/extra.proto").write_text(
        'syntax = "proto3";\n\npackage ingestion;\n\n// Extra is new.\nmessage Extra {\n'
        "  bytes payload = 1;\n}\n"
    )
    repo.commit_all("a new proto, its generated code never committed")
    result = repo.make("gen-check")
    assert result.returncode != 0
    assert f"?? {PY_WIRE}/ingestion/extra_pb2.py" in result.stderr


def test_a_committed_file_make_gen_does_not_make_fails_gen_check(
    repo_root: Path, tmp_path: Path
) -> None:
    repo = _repo(repo_root, tmp_path)
    stale = f"{PY_WIRE}/ingestion/stale_pb2.py"
    (repo.root / stale).write_text("# generated once from a proto that is gone\n")
    repo.commit_all("a generated file whose proto was removed")
    result = repo.make("gen-check")
    assert result.returncode != 0
    assert f" D {stale}" in result.stderr


def test_gen_check_writes_nothing_in_the_working_tree(repo_root: Path, tmp_path: Path) -> None:
    # Passing or failing, it generates elsewhere: a hand edit it reports stays as it was.
    repo = _repo(repo_root, tmp_path)
    assert repo.make("gen-check").returncode == 0
    assert repo.changed(".") == ""
    repo.edit(PEER_GO, "package ingestion", "package ingestion // edited by hand")
    repo.commit_all("a hand edit")
    repo.edit(PEER_GO, "// edited by hand", "// edited by hand, twice")
    (repo.root / f"{PY_WIRE}/ingestion/scratch.txt").write_text("untracked\n")
    before = repo.changed(".")
    assert repo.make("gen-check").returncode != 0
    assert repo.changed(".") == before
    assert "edited by hand, twice" in (repo.root / PEER_GO).read_text()


def test_a_renumbered_field_in_proto_moves_python_only(repo_root: Path, tmp_path: Path) -> None:
    # The peer's code comes from go-contract/, so it keeps speaking what Go speaks.
    repo = _repo(repo_root, tmp_path)
    repo.edit(INGESTION, "uint32 batch_size = 2;", "uint32 batch_size = 4;")
    result = repo.make("gen")
    assert result.returncode == 0, result.stdout + result.stderr
    assert repo.changed("go-compat-tests") == ""
    assert f" M {PY_WIRE}/ingestion/ingestion_pb2.py" in repo.changed(PY_WIRE)


def test_the_contract_suite_fails_when_proto_drifts_from_the_peer(
    repo_root: Path, tmp_path: Path
) -> None:
    # Our client, generated from a renumbered proto/, against the unchanged Go peer: one
    # contract test, run on the drifted Python code, must fail (not error, not skip).
    repo = _repo(repo_root, tmp_path)
    repo.edit(INGESTION, "uint32 batch_size = 2;", "uint32 batch_size = 4;")
    assert repo.make("gen").returncode == 0
    drifted_src = tmp_path / "src"
    # The whole package (its sub-packages too), with the drifted generated code in place of
    # the committed one.
    shutil.copytree(
        repo_root / "python/src/junjo_backend",
        drifted_src / "junjo_backend",
        ignore=shutil.ignore_patterns("_wire", "__pycache__"),
    )
    (drifted_src / "junjo_backend" / "_wire").symlink_to(repo.root / PY_WIRE)
    # Coverage must not follow the child: its files are gone by the time the report runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV", "JUNJO_COMPAT"))}
    env["PYTHONPATH"] = str(drifted_src)
    test = "tests/compat/test_ingestion_compat.py::test_batch_size_edges"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--no-cov", test],
        cwd=repo_root / "python",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert (
        str(drifted_src)
        in subprocess.run(
            [sys.executable, "-c", "import junjo_backend._wire.ingestion as w; print(w.__path__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    assert result.returncode == 1, output
    assert "1 failed" in output, output
