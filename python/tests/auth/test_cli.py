"""`junjo-backend api-keys create|list|revoke`, through `cli.main` and the console script."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from junjo_backend.auth.key_store import API_KEY_HEADER, key_fingerprint
from junjo_backend.cli import main as cli
from junjo_backend.settings import get_settings

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


def test_create_prints_only_the_key_on_stdout_and_how_to_use_it_on_stderr(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    status, out, err = run_cli("api-keys", "create", "my app")
    assert status == 0, err
    assert KEY_LINE.fullmatch(out.rstrip("\n")) is not None
    used_keys.add(out.strip())
    assert API_KEY_HEADER in err
    assert err.splitlines()[0].startswith("database: ")
    assert not used_keys.found_in(err)


def test_create_quiet_and_json(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    status, out, err = run_cli("api-keys", "create", "quiet", "-q")
    assert status == 0
    used_keys.add(out.strip())
    assert KEY_LINE.fullmatch(out.rstrip("\n")) is not None
    assert err == ""
    status, out, err = run_cli("api-keys", "create", "as json", "--json")
    assert status == 0, err
    created = json.loads(out)
    used_keys.add(created["key"])
    assert created["name"] == "as json"
    assert created["header"] == API_KEY_HEADER
    assert not used_keys.found_in(err)


def test_a_duplicate_name_gets_a_warning_even_when_quiet(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    _, out, err = run_cli("api-keys", "create", "twice", "-q")
    used_keys.add(out.strip())
    assert "warning" not in err
    status, out, err = run_cli("api-keys", "create", "twice", "-q")
    used_keys.add(out.strip())
    assert status == 0
    assert err.splitlines() == ["warning: another API key is already named 'twice'"]


def test_list_shows_ids_names_and_hints_but_never_a_key(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    run_cli("api-keys", "create", "makes the database", "-q")  # list never creates one
    created = []
    for name in ("first", "second"):
        _, out, _ = run_cli("api-keys", "create", name, "--json")
        new = json.loads(out)
        created.append((new["id"], used_keys.add(new["key"])))
    status, out, err = run_cli("api-keys", "list")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED", "(UTC)", "KEY", "HINT"]
    for (key_id, key), line in zip(created, lines[2:], strict=True):
        assert line.startswith(key_id)
        assert key_fingerprint(key) in line
    assert not KEY_LINE.search(out)
    assert not used_keys.found_in(out + err)
    status, out, err = run_cli("api-keys", "list", "--json")
    assert status == 0, err
    listed = json.loads(out)
    assert [entry["id"] for entry in listed[1:]] == [key_id for key_id, _ in created]
    assert {entry["key_hint"] for entry in listed[1:]} == {
        key_fingerprint(key) for _, key in created
    }
    assert not used_keys.found_in(out)


def test_check_names_the_stored_key_read_on_stdin(
    run_cli: Callable[..., tuple[int, str, str]],
    used_keys: KeyRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, out, _ = run_cli("api-keys", "create", "held by an operator", "--json")
    new = json.loads(out)
    used_keys.add(new["key"])
    monkeypatch.setattr("sys.stdin", io.StringIO(new["key"] + "\n"))
    status, out, err = run_cli("api-keys", "check")
    assert status == 0, err
    assert out == f"{new['id']}\theld by an operator\n"
    near_miss = new["key"][:-1] + ("x" if new["key"][-1] != "x" else "y")
    monkeypatch.setattr("sys.stdin", io.StringIO(near_miss + "\n"))
    status, out, err = run_cli("api-keys", "check")
    assert status == 1
    assert out == ""
    assert not used_keys.found_in(out + err)


def test_revoke_deletes_the_key_and_an_unknown_id_fails(
    run_cli: Callable[..., tuple[int, str, str]], used_keys: KeyRegistry
) -> None:
    _, out, _ = run_cli("api-keys", "create", "short-lived", "--json")
    new = json.loads(out)
    used_keys.add(new["key"])
    status, out, err = run_cli("api-keys", "revoke", new["id"])
    assert status == 0, err
    assert out == ""
    assert f"revoked API key {new['id']}" in err
    status, out, err = run_cli("api-keys", "revoke", new["id"])
    assert status == 1
    assert err.splitlines()[0].startswith("error: no API key has that id")
    _, out, _ = run_cli("api-keys", "list")
    assert new["id"] not in out


def test_an_unusable_database_is_one_error_line(
    run_cli: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The database's folder cannot be created (a file is in the way).
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{blocker / 'sub' / 'junjo.db'}")
    get_settings.cache_clear()
    status, _, err = run_cli("api-keys", "create", "x")
    assert status == 1
    expected = f"error: DATABASE_URL: cannot create the folder {blocker}"
    assert err.splitlines()[0].startswith(expected)
    # The database path is a folder: SQLite cannot open it.
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}")
    get_settings.cache_clear()
    status, _, err = run_cli("api-keys", "list")
    assert status == 1
    assert err.splitlines()[0].startswith(f"error: database {tmp_path} unavailable")
    assert "Traceback" not in err


def test_a_blank_name_is_refused(run_cli: Callable[..., tuple[int, str, str]]) -> None:
    status, _, err = run_cli("api-keys", "create", " ")
    assert status == 2
    assert err.splitlines()[0] == "error: an API key needs a name"


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
    found = ID_IN_CREATE.search(created.stderr)
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
