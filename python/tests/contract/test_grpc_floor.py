"""The grpc requirements' floor is the version the committed generated code needs.

Each generated `*_pb2_grpc.py` carries GRPC_GENERATED_VERSION (the grpcio-tools that made
it) and refuses to import under an older grpcio, so a floor below it installs a package
that cannot start.
"""

from __future__ import annotations

import re
import tomllib
from typing import TYPE_CHECKING

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if TYPE_CHECKING:
    from pathlib import Path

_GENERATED = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'$", re.MULTILINE)
# Installed beside grpcio and released with it: the same floor.
_RUNTIME = ("grpcio", "grpcio-health-checking", "grpcio-reflection")


def _generated_version(repo_root: Path) -> Version:
    files = sorted((repo_root / "python/src/junjo_backend/_wire").rglob("*_pb2_grpc.py"))
    assert files
    versions = set()
    for path in files:
        found = _GENERATED.search(path.read_text())
        assert found is not None, path
        versions.add(Version(found.group(1)))
    assert len(versions) == 1, versions  # one generator made them all
    return versions.pop()


def _requirements(repo_root: Path, group: str | None = None) -> dict[str, SpecifierSet]:
    project = tomllib.loads((repo_root / "python/pyproject.toml").read_text())
    listed = project["dependency-groups"][group] if group else project["project"]["dependencies"]
    return {req.name: req.specifier for req in map(Requirement, listed)}


def floor(specifier: SpecifierSet) -> Version | None:
    """The lowest version `specifier` admits, from its >=, ~= and == clauses (None: no floor)."""
    floors = []
    for clause in specifier:
        if clause.operator in {">=", "~=", "=="}:
            floors.append(Version(clause.version.removesuffix(".*")))
        elif clause.operator == ">":
            return None  # `> X` names no version it admits
    return max(floors, default=None)


def test_floor_reads_the_lowest_admitted_version() -> None:
    assert floor(SpecifierSet(">=1.85.1,<1.86")) == Version("1.85.1")
    assert floor(SpecifierSet("==1.85.*")) == Version("1.85.0")
    assert floor(SpecifierSet("~=1.85.1")) == Version("1.85.1")
    assert floor(SpecifierSet("<1.86")) is None


def test_the_grpc_floor_is_the_generated_codes_version(repo_root: Path) -> None:
    needed = _generated_version(repo_root)
    runtime = _requirements(repo_root)
    for name in _RUNTIME:
        assert floor(runtime[name]) == needed, (name, str(runtime[name]), str(needed))
        assert runtime[name].contains(needed)


def test_the_generator_is_pinned_to_the_generated_codes_version(repo_root: Path) -> None:
    tools = _requirements(repo_root, "dev")["grpcio-tools"]
    assert str(tools) == f"=={_generated_version(repo_root)}"
