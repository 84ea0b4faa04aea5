"""The package stands on its own: a wheel from a clean checkout runs with neither buf nor Go.

The "clean checkout" is the tracked files of python/ (as they are in the working tree),
without anything `make gen` or `uv sync` would add; the wheel goes into a fresh venv with
pip, and its command runs with a PATH that holds nothing but that venv.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from typing import TYPE_CHECKING

import pytest

import junjo_backend

if TYPE_CHECKING:
    from pathlib import Path

_TIMEOUT_SECONDS = 600


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


def _clean_checkout(repo_root: Path, dest: Path) -> Path:
    tracked = subprocess.run(
        ["git", "-C", str(repo_root), "ls-files", "-z", "--", "python"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\0")
    for relative in filter(None, tracked):
        source = repo_root / relative
        if source.is_file():  # a tracked file deleted in the working tree is not there
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, dest / relative)
    return dest / "python"


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkout = _clean_checkout(repo_root, tmp_path_factory.mktemp("checkout"))
    assert not (checkout / ".venv").exists()
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [*_uv(), "build", "--quiet", "--project", str(checkout), "-o", str(dist)],
        cwd=checkout,
        check=True,
        timeout=_TIMEOUT_SECONDS,
    )
    (built,) = dist.glob("*.whl")
    return built


def test_the_wheel_ships_every_generated_module(repo_root: Path, wheel: Path) -> None:
    wire = repo_root / "python" / "src"
    generated = {
        p.relative_to(wire).as_posix()
        for p in (wire / "junjo_backend" / "_wire").rglob("*")
        if p.suffix in {".py", ".pyi"}
    }
    assert len(generated) == 12
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert generated <= names, generated - names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_installed_wheel_runs_without_buf_or_go(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        timeout=_TIMEOUT_SECONDS,
    )
    bare_path = str(venv / "bin")
    assert shutil.which("buf", path=bare_path) is None
    assert shutil.which("go", path=bare_path) is None
    env = {"PATH": bare_path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    help_text = subprocess.run(
        [str(venv / "bin" / "junjo-backend"), "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "api-keys" in help_text
    imported = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            (
                "import junjo_backend, junjo_backend._wire.ingestion.ingestion_pb2_grpc as w;"
                "print(junjo_backend.__version__, w.__file__)"
            ),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert imported.startswith(f"{junjo_backend.__version__} {venv}")


def test_the_version_is_defined_once_in_pyproject(repo_root: Path) -> None:
    pyproject = tomllib.loads((repo_root / "python" / "pyproject.toml").read_text())
    assert junjo_backend.__version__ == pyproject["project"]["version"]
    init = (repo_root / "python" / "src" / "junjo_backend" / "__init__.py").read_text()
    assert pyproject["project"]["version"] not in init


def test_the_license_is_apache_2_and_both_copies_agree(repo_root: Path) -> None:
    pyproject = tomllib.loads((repo_root / "python" / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    text = (repo_root / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert (repo_root / "python" / "LICENSE").read_bytes() == text.encode()
    assert not (repo_root / "python" / "LICENSE").is_symlink()
    assert (repo_root / "python" / pyproject["project"]["readme"]).is_file()


def test_make_run_neither_generates_nor_needs_go(repo_root: Path) -> None:
    # A dry run lists every command `make run` would run (its environment setup aside).
    planned = subprocess.run(
        ["make", "-n", "-o", "setup-python", "-C", str(repo_root), "run"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "junjo-backend serve" in planned
    assert "generate" not in planned
    assert "go " not in planned
    assert "go-compat-tests" not in planned
    # and the setup it depends on is Python's alone.
    rule = subprocess.run(
        ["make", "-p", "-n", "-C", str(repo_root), "help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "\nrun: setup-python\n" in rule
    assert "\nsetup-python: uv\n" in rule
