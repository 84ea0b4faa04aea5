"""What the CLI says back, through the real CLI in a subprocess (exit status, first stderr line).

- A key where an argument goes is never repeated: not by argparse, not in a not-found
  message, and it is never stored as a name.
- Write commands never make a database (only `serve` and `api-keys create` do).
- Data commands print no INFO log line; `-q` leaves data, errors and configuration warnings.
- `.env` keys that are not settings are warned about; `config` prints the settings in effect.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from typing import TYPE_CHECKING

import pytest

from junjo_backend.auth.key_store import generate_api_key

from .test_operator_errors import first_error_line, run_cli

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

_HIDDEN = "<64 characters, not shown>"


def _db_env(tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'junjo.db'}"}


def _no_key_in(result: subprocess.CompletedProcess[str], key: str) -> None:
    output = result.stdout + result.stderr
    assert key[:12] not in output
    assert key[-12:] not in output


@pytest.mark.parametrize(
    "argv",
    [
        ("api-keys", "check", "{key}"),
        ("spans", "tail", "{key}"),
        ("api-keys", "list", "--json", "{key}"),
        ("api-keys", "check", "--json={key}"),
        ("api-keys", "{key}"),
        ("{key}",),
    ],
)
def test_a_key_as_an_argument_is_never_repeated(tmp_path: Path, argv: tuple[str, ...]) -> None:
    key = generate_api_key()
    result = run_cli(tmp_path, *(arg.format(key=key) for arg in argv))
    assert result.returncode == 2
    line = first_error_line(result)
    assert line.startswith("error: ")
    assert "not shown>" in line
    assert "it looks like an API key" in line
    _no_key_in(result, key)
    assert not (tmp_path / "data").exists()


def test_a_piece_of_a_key_as_an_argument_is_not_repeated_either(tmp_path: Path) -> None:
    piece = generate_api_key()[:20]
    result = run_cli(tmp_path, "api-keys", "check", piece)
    assert result.returncode == 2
    assert first_error_line(result) == ("error: unrecognized arguments: <20 characters, not shown>")
    assert piece[:12] not in result.stderr


def test_an_argument_error_still_shows_short_values(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "api-keys", "lst")
    assert result.returncode == 2
    assert first_error_line(result).startswith("error: argument ACTION: invalid choice: 'lst'")


def test_a_key_with_quotes_is_hidden_whatever_repr_makes_of_it(tmp_path: Path) -> None:
    key = generate_api_key()
    result = run_cli(tmp_path, "spans", "tail", "--timeout", f"it's\t{key}")
    assert result.returncode == 2
    assert first_error_line(result).startswith("error: argument --timeout: ")
    _no_key_in(result, key)


def test_a_key_given_as_a_name_or_an_id_is_refused_unrepeated(tmp_path: Path) -> None:
    key = generate_api_key()
    for argv in (("create", key), ("create", f"app {key}"), ("revoke", key)):
        result = run_cli(tmp_path, "api-keys", *argv, env=_db_env(tmp_path))
        assert result.returncode == 2, result.stderr
        assert first_error_line(result).startswith(
            ("error: the name looks like an API key", "error: that is an API key, not a key's id")
        )
        _no_key_in(result, key)
    assert not (tmp_path / "data").exists()  # refused before any database was opened


@pytest.mark.parametrize("name", ["\x1b[31mred", "two\nlines", "tab\there", "rtl\u202eeman"])
def test_a_name_with_control_characters_is_refused(tmp_path: Path, name: str) -> None:
    result = run_cli(tmp_path, "api-keys", "create", name, env=_db_env(tmp_path))
    assert result.returncode == 2
    assert first_error_line(result) == (
        "error: the name holds control characters (they would break `list`)"
    )
    assert result.stdout == ""


def test_revoke_json_and_a_not_found_id_is_not_repeated(tmp_path: Path) -> None:
    env = _db_env(tmp_path)
    created = run_cli(tmp_path, "api-keys", "create", "app", "--json", env=env)
    new = json.loads(created.stdout)
    revoked = run_cli(tmp_path, "api-keys", "revoke", new["id"], "--json", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"id": new["id"], "revoked": True}
    again = run_cli(tmp_path, "api-keys", "revoke", new["id"], "--json", env=env)
    assert again.returncode == 1
    assert again.stdout == ""
    assert first_error_line(again).startswith("error: no API key has that id (see: ")
    assert new["id"] not in again.stderr


def test_revoke_never_makes_a_database(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "api-keys", "revoke", "some-id", env=_db_env(tmp_path))
    assert result.returncode == 1
    database = tmp_path / "data" / "junjo.db"
    assert first_error_line(result).startswith(f"error: DATABASE_URL: no database at {database}")
    assert not (tmp_path / "data").exists()


def test_spans_tail_blames_the_address_option(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli(
        tmp_path, "spans", "tail", "--from-start", "--address", address, "--timeout", "1"
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]]
    assert errors[0].startswith(f"error: --address: nothing answered at {address}")
    quiet = run_cli(
        tmp_path, "spans", "tail", "-q", "--from-start", "--address", address, "--timeout", "1"
    )
    assert quiet.returncode == 1
    assert quiet.stderr.splitlines() == errors  # -q: no "waiting for ..." line


@pytest.mark.parametrize("argv", [("api-keys", "create", "app"), ("api-keys", "list"), ("config",)])
def test_data_commands_print_no_info_log_line(tmp_path: Path, argv: tuple[str, ...]) -> None:
    env = {**_db_env(tmp_path), "LOG_LEVEL": "INFO", "LOG_FORMAT": "text"}
    run_cli(tmp_path, "api-keys", "create", "first", env=env)
    result = run_cli(tmp_path, *argv, env=env)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "level=INFO" in line]


def test_quiet_leaves_data_errors_and_configuration_warnings(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HTTP_PROT=1324\n")
    env = {**_db_env(tmp_path), "LOG_LEVEL": "DEBUG"}
    result = run_cli(tmp_path, "api-keys", "create", "app", "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 64
    assert result.stderr.splitlines() == [
        "warning: .env: HTTP_PROT is not a setting (did you mean HTTP_PORT?)"
    ]


def test_an_env_file_typo_is_warned_about_on_every_command(tmp_path: Path) -> None:
    key = generate_api_key()
    (tmp_path / ".env").write_text(f"HTTP_PROT=1324\nlog_level=INFO\nWHATEVER_ELSE=1\n{key}\n")
    result = run_cli(tmp_path, "api-keys", "list", env=_db_env(tmp_path))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: .env: HTTP_PROT is not a setting (did you mean HTTP_PORT?)",
        "warning: .env: WHATEVER_ELSE is not a setting (see `serve --help` for the settings)",
        "warning: .env: a line is not a setting (it looks like an API key)",
    ]
    _no_key_in(result, key)
    # With a bad setting too: the error first, the warnings after it.
    failed = run_cli(tmp_path, "serve", env={"HTTP_PORT": "abc"})
    assert failed.returncode == 2
    assert first_error_line(failed).startswith("error: HTTP_PORT: ")
    assert "warning: .env: HTTP_PROT is not a setting (did you mean HTTP_PORT?)" in failed.stderr
    # The environment is not checked: it holds every other program's variables.
    clean = tmp_path / "clean"
    clean.mkdir()
    quiet = run_cli(clean, "config", env={"HTTP_PROT": "1"})
    assert "warning" not in quiet.stderr


def test_config_prints_each_setting_with_its_source_and_secrets_masked(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POLLER_BATCH_SIZE=500\nLOG_LEVEL=debug\n")
    url = "postgresql+asyncpg://junjo:s3cret-pass@db.example:5432/junjo"
    result = run_cli(tmp_path, "config", env={"DATABASE_URL": url, "LOG_LEVEL": "warn"})
    assert result.returncode == 0, result.stderr
    rows = {line.split("=", 1)[0]: line for line in result.stdout.splitlines()}
    assert rows["DATABASE_URL"].split() == [
        "DATABASE_URL=postgresql+asyncpg://junjo:***@db.example:5432/junjo",
        "(environment)",
    ]
    assert rows["POLLER_BATCH_SIZE"].split() == ["POLLER_BATCH_SIZE=500", "(.env)"]
    assert rows["LOG_LEVEL"].split() == ["LOG_LEVEL=WARNING", "(environment)"]
    assert rows["LOG_FORMAT"].split() == ["LOG_FORMAT=text", "(default)"]
    assert "s3cret-pass" not in result.stdout + result.stderr
    token = "span-token-" + generate_api_key()
    as_json = run_cli(
        tmp_path, "config", "--json", env={"DATABASE_URL": url, "SPAN_API_TOKEN": token}
    )
    assert token[-12:] not in as_json.stdout + as_json.stderr
    report = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert report["DATABASE_URL"]["value"] == "postgresql+asyncpg://junjo:***@db.example:5432/junjo"
    assert report["SPAN_API_TOKEN"] == {
        "name": "SPAN_API_TOKEN",
        "value": "***",
        "source": "environment",
    }
    assert report["POLLER_BATCH_SIZE"] == {
        "name": "POLLER_BATCH_SIZE",
        "value": "500",
        "source": ".env",
    }


def test_config_exits_2_on_an_invalid_setting(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config", env={"HTTP_PORT": "abc"})
    assert result.returncode == 2
    assert first_error_line(result).startswith("error: HTTP_PORT: Input should be a valid integer")
    assert result.stdout == ""


def test_serve_help_says_its_values_are_the_defaults(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--help", env={"HTTP_PORT": "1999"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "The values below are the defaults, whatever is set here; `junjo-backend config`" in text
    assert "HTTP_PORT=1323" in result.stdout


def test_a_secret_field_is_masked_whole() -> None:
    from junjo_backend.cli.config_command import shown_value  # noqa: PLC0415
    from junjo_backend.settings import SECRET, Settings  # noqa: PLC0415

    field = Settings.model_fields["http_host"]
    original = field.json_schema_extra
    field.json_schema_extra = {"secret": SECRET}
    try:
        assert shown_value("http_host", "hunter2") == "***"
        assert shown_value("http_host", "") == ""
    finally:
        field.json_schema_extra = original
    assert shown_value("http_host", "hunter2") == "hunter2"


def test_sqlite_files_untouched_by_refused_commands(tmp_path: Path) -> None:
    """A refused create leaves an existing database as it was (no row, no schema change)."""
    env = _db_env(tmp_path)
    run_cli(tmp_path, "api-keys", "create", "app", env=env)
    run_cli(tmp_path, "api-keys", "create", "bad\x07name", env=env)
    with sqlite3.connect(tmp_path / "data" / "junjo.db") as conn:
        assert conn.execute("SELECT name FROM api_keys").fetchall() == [("app",)]
