"""`junjo-backend api-keys create|list|revoke`, through `cli.main` and the console script."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from junjo_backend import cli
from junjo_backend.api_keys import API_KEY_HEADER, key_fingerprint, run_api_keys_command
from junjo_backend.settings import Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from .auth_calls import KeyRegistry

KEY_LINE = re.compile(r"^\s*([0-9A-Za-z]{64})\s*$", re.MULTILINE)
ID_IN_CREATE = re.compile(r"\(id ([A-Za-z0-9_-]+)\)")


@pytest.fixture
def run_cli(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`cli.main(argv)` against the test's database; returns (status, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    get_settings.cache_clear()

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            status = cli.main(list(argv))
        finally:
            # cli.main installs the app's log handler and level; the session's log watch
            # must keep seeing DEBUG records afterwards.
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
            root.setLevel(level)
        out, err = capsys.readouterr()
        return status, out, err

    yield run
    get_settings.cache_clear()


def test_create_prints_the_key_once_with_how_to_use_it(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    status, out, err = run_cli("api-keys", "create", "my app")
    assert status == 0, err
    keys = KEY_LINE.findall(out)
    assert len(keys) == 1
    key = used_keys.add(keys[0])
    assert out.count(key) == 1
    assert API_KEY_HEADER in out
    assert not used_keys.found_in(err)


def test_list_shows_ids_names_and_hints_but_never_a_key(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    status, out, _ = run_cli("api-keys", "list")
    assert status == 0
    assert "No API keys" in out
    created = []
    for name in ("first", "second"):
        _, out, _ = run_cli("api-keys", "create", name)
        created.append((ID_IN_CREATE.search(out), used_keys.add(KEY_LINE.findall(out)[0])))
    status, out, err = run_cli("api-keys", "list")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED", "(UTC)", "KEY", "HINT"]
    for (key_id, key), line in zip(created, lines[1:], strict=True):
        assert key_id is not None
        assert line.startswith(key_id.group(1))
        assert key_fingerprint(key) in line
    assert not KEY_LINE.search(out)
    assert not used_keys.found_in(out + err)


def test_revoke_deletes_the_key_and_an_unknown_id_fails(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    _, out, _ = run_cli("api-keys", "create", "short-lived")
    used_keys.add(KEY_LINE.findall(out)[0])
    found = ID_IN_CREATE.search(out)
    assert found is not None
    key_id = found.group(1)
    status, out, err = run_cli("api-keys", "revoke", key_id)
    assert status == 0, err
    assert f"Revoked API key {key_id}" in out
    status, out, err = run_cli("api-keys", "revoke", key_id)
    assert status == 1
    assert "no API key with id" in err
    _, out, _ = run_cli("api-keys", "list")
    assert key_id not in out


def test_an_unusable_database_is_an_error_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The database's folder cannot be created (a file is in the way).
    url = f"sqlite+aiosqlite:///{blocker / 'sub' / 'junjo.db'}"
    settings = Settings(database_url=url, _env_file=None)
    args = argparse.Namespace(api_keys_command="list")
    assert _run(settings, args) == 1
    # The database path is a folder: SQLite cannot open it.
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}", _env_file=None)
    assert _run(settings, args) == 1
    assert "database unavailable" in capsys.readouterr().err


def test_an_unknown_action_is_a_usage_error(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(settings, argparse.Namespace(api_keys_command="rotate")) == 2
    assert "unknown api-keys command" in capsys.readouterr().err


def test_a_blank_name_is_refused(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(settings, argparse.Namespace(api_keys_command="create", name=" ")) == 1
    assert "needs a name" in capsys.readouterr().err


def _run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(run_api_keys_command(settings, args, io.StringIO()))


def test_the_console_script_creates_lists_and_revokes(
    console_script: str, database_url: str, used_keys: KeyRegistry
) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "DEBUG"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [console_script, *argv],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = run("api-keys", "create", "from the shell")
    assert created.returncode == 0, created.stderr
    used_keys.add(KEY_LINE.findall(created.stdout)[0])
    # At DEBUG the process logs everything it does, and still never the key (or a part).
    assert not used_keys.found_in(created.stderr)
    found = ID_IN_CREATE.search(created.stdout)
    assert found is not None

    listed = run("api-keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert found.group(1) in listed.stdout
    assert not used_keys.found_in(listed.stdout + listed.stderr)

    revoked = run("api-keys", "revoke", found.group(1))
    assert revoked.returncode == 0, revoked.stderr
    assert run("api-keys", "revoke", found.group(1)).returncode == 1

    usage = run("api-keys")
    assert usage.returncode == 2
    assert "ACTION" in usage.stderr
