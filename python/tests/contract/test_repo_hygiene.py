"""The repository stands on its own and keeps its working tree clean.

- No tracked file points outside the repository: no path into a `shared` folder beside it,
  no performance notes file it lacks, no notes of a closed issue. What such a reference
  meant is written into the repository's own docs (docs/).
- Database files live only in test data under python/tests; the top level ignores them, and
  everything the targets write (coverage, results, binaries) is ignored too.
- Only `make gen` writes the committed generated code: no other target depends on it.
"""

from __future__ import annotations

import re
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

# Built from pieces, so that this file does not match itself.
_SHARED_DIR = "shared" + "/"
_SHARED = re.compile(r"(?<![\w.-])" + _SHARED_DIR)
_NOTES_FILE = "PERFORMANCE" + ".md"
_CLOSING_NOTES = re.compile("closing" + r"\s+" + "notes", re.IGNORECASE)
_DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".duckdb")
_SQLITE_MAGIC = b"SQLite format 3\0"
_DUCKDB_MAGIC = b"DUCK"  # at offset 8 of a DuckDB file


def _tracked(repo_root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(repo_root), "ls-files", "-z"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [name for name in listed.split("\0") if name and (repo_root / name).is_file()]


def outside_references(text: str, files: set[str]) -> list[str]:
    """What in `text` points outside a repository holding `files` (base names)."""
    found = [match.group(0) for match in _SHARED.finditer(text)]
    if _NOTES_FILE in text and _NOTES_FILE not in files:
        found.append(_NOTES_FILE)
    found += [match.group(0) for match in _CLOSING_NOTES.finditer(text)]
    return found


def test_the_check_finds_each_kind_of_reference() -> None:
    files = {"README.md"}
    assert outside_references("see ../" + "shared" + "/CONTRACT.md", files) == [_SHARED_DIR]
    assert outside_references("bars of " + "shared" + "/X.md", files) == [_SHARED_DIR]
    assert outside_references("in the team's " + _NOTES_FILE, files) == [_NOTES_FILE]
    assert outside_references("in the team's " + _NOTES_FILE, {_NOTES_FILE}) == []
    assert outside_references("in the closing\n" + "notes of the issues", files)
    assert outside_references("a not-shared/ folder, docs/performance.md", files) == []


def test_no_tracked_file_points_outside_the_repository(repo_root: Path) -> None:
    tracked = _tracked(repo_root)
    names = {name.rsplit("/", 1)[-1] for name in tracked}
    offenders = []
    for name in tracked:
        data = (repo_root / name).read_bytes()
        if b"\0" in data:
            continue  # binary
        found = outside_references(data.decode(errors="replace"), names)
        offenders += [f"{name}: {ref}" for ref in found]
    assert offenders == []


def _is_database(path: Path) -> bool:
    if path.name.endswith(_DATABASE_SUFFIXES):
        return True
    with path.open("rb") as file:
        head = file.read(16)
    return head.startswith(_SQLITE_MAGIC) or head[8:12] == _DUCKDB_MAGIC


def test_database_files_are_tracked_only_as_test_data(repo_root: Path) -> None:
    databases = [name for name in _tracked(repo_root) if _is_database(repo_root / name)]
    assert [name for name in databases if not name.startswith("python/tests/")] == []


def test_what_the_targets_write_is_ignored(repo_root: Path) -> None:
    written = [
        "junjo.db",
        "junjo.db-journal",
        "junjo.db-wal",
        "otel_data.db",
        "otel_data.db.wal",
        "data/junjo.db",
        "python/data/junjo.db",
        ".coverage",
        "python/.coverage",
        "python/.coverage.host.1234.5678",
        "python/coverage.xml",
        "fault-results/faults.json",
        "bench-results/auth.json",
        "go-compat-tests/bin/walseed",
        ".env",
    ]
    checked = subprocess.run(
        ["git", "-C", str(repo_root), "check-ignore", "--no-index", "--stdin"],
        input="\n".join(written) + "\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    ignored = set(checked.stdout.split())
    assert [path for path in written if path not in ignored] == []


def prerequisites(makefile: str) -> dict[str, set[str]]:
    """Each rule's target and the targets it depends on, from `target: deps ## ...` lines."""
    rules: dict[str, set[str]] = {}
    for target, deps in re.findall(r"^([a-z][a-z-]*):(?!=)([^#\n]*)", makefile, re.MULTILINE):
        rules.setdefault(target, set()).update(deps.split())
    return rules


def _reached(rules: dict[str, set[str]], target: str) -> set[str]:
    seen: set[str] = set()
    todo = [target]
    while todo:
        for dep in rules.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_only_gen_writes_the_generated_code(repo_root: Path) -> None:
    # The code is committed: nothing but `make gen` (and gen-check, in a temporary folder,
    # tests/contract/test_generated_code.py) regenerates it.
    rules = prerequisites((repo_root / "Makefile").read_text())
    for target in ("lint", "test", "gen-check", "faults", "compat", "peer", "demo", "bench"):
        assert target in rules, target
        assert "gen" not in _reached(rules, target), target


def test_the_check_follows_prerequisites() -> None:
    rules = prerequisites("lint: setup actionlint ## lint\nactionlint: gen\nPY := x\ngen: setup\n")
    assert rules == {"lint": {"setup", "actionlint"}, "actionlint": {"gen"}, "gen": {"setup"}}
    assert "gen" in _reached(rules, "lint")
