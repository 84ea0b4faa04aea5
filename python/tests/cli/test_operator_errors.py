"""An operator's mistakes, through the real CLI in a subprocess: one `error:` line, no traceback.

Each case asserts the exit status and the first line of stderr, which must name the
setting (or address, or path) and the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

# The ports of these runs: 0 (any free port) unless a case says otherwise.
_QUIET_PORTS = {"AUTH_GRPC_LISTEN_ADDRESS": "127.0.0.1:0", "HTTP_PORT": "0"}


def run_cli(
    cwd: Path, *argv: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`python -m junjo_backend ARGV` in `cwd`, with a clean settings environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in _SETTING_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "junjo_backend", *argv],
        env={**base, **_QUIET_PORTS, **(env or {})},
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


_SETTING_NAMES = frozenset(
    name.upper()
    for name in (
        "database_url",
        "auth_grpc_listen_address",
        "ingestion_grpc_address",
        "http_host",
        "http_port",
        "log_level",
        "log_format",
        "poller_batch_size",
        "poller_enabled",
    )
)


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that something already listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung PostgreSQL)."""
    stop = threading.Event()
    held: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                held.append(conn)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        yield server.getsockname()[1]
        stop.set()
        thread.join()
        for conn in held:
            conn.close()


def first_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert lines, f"nothing on stderr (exit {result.returncode})"
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HTTP_PORT": "abc"}, "error: HTTP_PORT: Input should be a valid integer"),
        ({"HTTP_PORT": "70000"}, "error: HTTP_PORT: Input should be less than or equal to 65535"),
        ({"LOG_LEVEL": "LOUD"}, "error: LOG_LEVEL: Input should be 'DEBUG', 'INFO'"),
        ({"LOG_FORMAT": "xml"}, "error: LOG_FORMAT: Input should be 'text' or 'json'"),
        ({"POLLER_BATCH_SIZE": "0"}, "error: POLLER_BATCH_SIZE: Input should be greater than 0"),
        ({"DATABASE_URL": "notaurl"}, "error: DATABASE_URL: not a database URL"),
        ({"DATABASE_URL": "mysql://h/db"}, "error: DATABASE_URL: driver 'mysql' is not supported"),
        (
            {"AUTH_GRPC_LISTEN_ADDRESS": "127.0.0.1:99999"},
            "error: AUTH_GRPC_LISTEN_ADDRESS: port 99999 is out of range",
        ),
        (
            {"INGESTION_GRPC_ADDRESS": "no-port"},
            "error: INGESTION_GRPC_ADDRESS: expected HOST:PORT",
        ),
    ],
)
@pytest.mark.parametrize("command", [("serve",), ("api-keys", "list")])
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], expected: str, command: tuple[str, ...]
) -> None:
    result = run_cli(tmp_path, *command, env=env)
    assert result.returncode == 2
    assert first_error_line(result).startswith(expected)
    assert not (tmp_path / "data").exists()


def test_a_bad_database_url_is_never_echoed(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "api-keys", "list", env={"DATABASE_URL": "oops://u:hunter2@h/d"})
    assert result.returncode == 2
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("command", [("serve",), ("api-keys", "list")])
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://junjo:p@ss/w0rd@127.0.0.1:5432/junjo",  # SQLAlchemy: password p, host ss
        "postgres://junjo:p@ss@127.0.0.1/junjo",
        "postgresql+asyncpg://:secret@part@127.0.0.1/junjo",
    ],
)
def test_a_password_with_a_raw_at_sign_is_refused_unechoed(
    tmp_path: Path, url: str, command: tuple[str, ...]
) -> None:
    result = run_cli(tmp_path, *command, env={"DATABASE_URL": url})
    assert result.returncode == 2
    assert first_error_line(result).startswith(
        "error: DATABASE_URL: cannot be parsed: it holds more than one '@'"
    )
    assert "percent-encoded" in first_error_line(result)
    password = url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    pieces = [password] + [p for p in password.replace("/", "@").split("@") if len(p) >= 4]
    for piece in pieces:  # shorter pieces ("ss") are in ordinary words
        assert piece not in result.stderr, piece
    assert "127.0.0.1" not in result.stderr  # nothing of the URL, not even its host


def test_a_percent_encoded_password_is_masked_whole() -> None:
    from junjo_backend.database import database_label  # noqa: PLC0415
    from junjo_backend.settings import async_database_url  # noqa: PLC0415

    for url in (
        "postgresql://junjo:p%40ss%2Fword@127.0.0.1:5432/junjo",
        "postgresql://junjo:pa/ss:w?rd@127.0.0.1:5432/junjo",  # one '@': parsed as written
    ):
        label = database_label(async_database_url(url))
        assert label == "postgresql+asyncpg://junjo:***@127.0.0.1:5432/junjo"


@pytest.mark.parametrize("level", ["debug", "warn", "Warning"])
def test_log_levels_are_case_insensitive(tmp_path: Path, level: str) -> None:
    result = run_cli(tmp_path, "api-keys", "create", "k", "-q", env={"LOG_LEVEL": level})
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 64


def test_a_taken_auth_port_is_one_line(tmp_path: Path, listening_socket: socket.socket) -> None:
    address = f"127.0.0.1:{listening_socket.getsockname()[1]}"
    result = run_cli(tmp_path, "serve", env={"AUTH_GRPC_LISTEN_ADDRESS": address})
    assert result.returncode == 1
    assert first_error_line(result) == (
        f"error: AUTH_GRPC_LISTEN_ADDRESS: cannot listen on {address}: Address already in use"
    )


def test_a_taken_http_port_is_one_line(tmp_path: Path, listening_socket: socket.socket) -> None:
    port = listening_socket.getsockname()[1]
    result = run_cli(tmp_path, "serve", env={"HTTP_PORT": str(port)})
    assert result.returncode == 1
    assert first_error_line(result) == (
        f"error: HTTP_HOST/HTTP_PORT: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_an_unreachable_postgresql_is_one_line_with_a_note(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql://junjo:secret@127.0.0.1:{port}/junjo"
    for command in (("serve",), ("api-keys", "list")):
        result = run_cli(tmp_path, *command, env={"DATABASE_URL": url})
        assert result.returncode == 1
        first = first_error_line(result)
        assert first.startswith("error: ")
        assert "DATABASE_URL" in first or "database postgresql+asyncpg" in first
        assert "Connect call failed" in first
        assert "DATABASE_URL: postgresql:// rewritten to postgresql+asyncpg://" in result.stderr
        assert "secret" not in result.stderr


def test_a_postgresql_that_never_answers_times_out(tmp_path: Path, silent_server: int) -> None:
    url = f"postgresql+asyncpg://junjo:pw@127.0.0.1:{silent_server}/junjo"
    env = {"DATABASE_URL": url, "DATABASE_CONNECT_TIMEOUT_SECONDS": "1"}
    for command in (("serve",), ("api-keys", "list")):
        started = time.monotonic()
        result = run_cli(tmp_path, *command, env=env)
        # A hang guard, far above the 1 s timeout (and far below the 62 s it took before).
        assert time.monotonic() - started < 45
        assert result.returncode == 1
        assert first_error_line(result).startswith("error: ")
        assert "Timeout" in result.stderr.splitlines()[0] or "no answer" in result.stderr


def test_an_unwritable_data_folder_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    url = f"sqlite+aiosqlite:///{blocker / 'junjo.db'}"
    result = run_cli(tmp_path, "serve", env={"DATABASE_URL": url})
    assert result.returncode == 1
    first = first_error_line(result)
    assert first.startswith("error: DATABASE_URL: ")
    assert str(blocker) in first


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    for url in (f"sqlite+aiosqlite:///{tmp_path}/nonexistent-dir/x.db", "sqlite:///data/x.db"):
        result = run_cli(tmp_path, "api-keys", "list", env={"DATABASE_URL": url})
        assert result.returncode == 1
        assert first_error_line(result).startswith("error: DATABASE_URL: no database at /")
        check = run_cli(tmp_path, "api-keys", "check", env={"DATABASE_URL": url}, stdin="k\n")
        assert check.returncode == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_command_names_its_database_as_an_absolute_path(tmp_path: Path) -> None:
    created = run_cli(tmp_path, "api-keys", "create", "k")
    assert created.returncode == 0, created.stderr
    assert f"database: {tmp_path / 'data' / 'junjo.db'}" in created.stderr.splitlines()
    listed = run_cli(tmp_path, "api-keys", "list", "-q")
    assert listed.returncode == 0
    assert listed.stderr == ""


def test_version_and_module_entry_point(tmp_path: Path) -> None:
    from junjo_backend import __version__  # noqa: PLC0415

    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"junjo-backend {__version__}"


def test_serve_help_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    from junjo_backend.settings import Settings  # noqa: PLC0415

    result = run_cli(tmp_path, "serve", "--help")
    assert result.returncode == 0
    for name, field in Settings.model_fields.items():
        assert f"{name.upper()}=" in result.stdout
        assert str(field.description).split()[0] in result.stdout
