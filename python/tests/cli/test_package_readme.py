"""python/README.md, the package's page on PyPI, says what the package does.

Every command it shows parses, the addresses it names are the settings' defaults, every
setting it names exists, the extra it installs is declared, and its links are absolute (a
relative link is dead on PyPI).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from typing import TYPE_CHECKING

from junjo_backend.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

_SERVES = re.compile(r"auth gRPC on (\S+), HTTP on (\S+)")
_SETTING = re.compile(r"`([A-Z][A-Z0-9_]+)=?[^`]*`")
_LINK = re.compile(r"\]\(([^)]+)\)")


def _readme(repo_root: Path) -> str:
    return (repo_root / "python" / "README.md").read_text()


def _shell_lines(readme: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert blocks
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]


def serves(readme: str) -> tuple[str, str]:
    """The auth and HTTP addresses the README says `serve` listens on."""
    found = _SERVES.search(readme)
    assert found is not None, "the README no longer says where serve listens"
    return found.group(1), found.group(2)


def test_it_is_the_packages_readme(repo_root: Path) -> None:
    project = tomllib.loads((repo_root / "python" / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md"


def test_serve_listens_where_the_readme_says(repo_root: Path) -> None:
    defaults = Settings.model_validate({})
    auth, http = serves(_readme(repo_root))
    assert auth == defaults.auth_grpc_listen_address
    assert http == f"{defaults.http_host}:{defaults.http_port}"


def test_the_check_reads_a_stale_address() -> None:
    stale = "junjo-backend serve  # auth gRPC on 0.0.0.0:50053, HTTP on 0.0.0.0:1323\n"
    assert serves(stale) == ("0.0.0.0:50053", "0.0.0.0:1323")
    assert serves(stale)[0] != Settings.model_validate({}).auth_grpc_listen_address


def test_every_setting_it_names_exists(repo_root: Path) -> None:
    named = set(_SETTING.findall(_readme(repo_root)))
    assert named  # the README names the settings an operator must know
    assert named <= {name.upper() for name in Settings.model_fields}


def test_what_it_installs_is_declared(repo_root: Path) -> None:
    project = tomllib.loads((repo_root / "python" / "pyproject.toml").read_text())["project"]
    readme = _readme(repo_root)
    installed = re.findall(r"pip install '?([\w.-]+)(?:\[([\w,-]+)\])?", readme)
    assert installed
    for name, extras in installed:
        assert name == project["name"]
        for extra in filter(None, extras.split(",")):
            assert extra in project["optional-dependencies"], extra


def _commands(repo_root: Path) -> list[list[str]]:
    lines = _shell_lines(_readme(repo_root))
    return [shlex.split(line)[1:] for line in lines if line.startswith("junjo-backend")]


def test_each_command_it_shows_parses(repo_root: Path, tmp_path: Path) -> None:
    commands = _commands(repo_root)
    assert ["serve"] in commands
    for command in commands:
        # `--help` after the words: the parser checks them and exits 0; nothing runs.
        args = command if "--help" in command else [*command, "--help"]
        done = subprocess.run(
            [sys.executable, "-m", "junjo_backend", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith("usage: junjo-backend"), command


def test_its_links_are_absolute(repo_root: Path) -> None:
    links = _LINK.findall(_readme(repo_root))
    assert links
    assert all(link.startswith("https://") for link in links), links
