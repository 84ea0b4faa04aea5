"""What `serve` writes to stderr, in both formats: only log lines, under our logger names."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import urllib.request
from typing import TYPE_CHECKING

import pytest

from junjo_backend.auth.key_store import generate_api_key
from junjo_backend.settings import Settings
from tests.serve_process import ServeProcess

from .test_operator_errors import _SETTING_NAMES

if TYPE_CHECKING:
    from pathlib import Path

# One logfmt pair: key=bare-value or key="quoted value with \" escapes".
_LOGFMT_PAIR = r'[A-Za-z_][A-Za-z0-9_.]*=(?:"(?:[^"\\]|\\.)*"|[^\s"=]+)'
LOGFMT_LINE = re.compile(rf"^{_LOGFMT_PAIR}(?: {_LOGFMT_PAIR})*$")
_SLOG_LEVELS = {"DEBUG", "INFO", "WARN", "ERROR"}


_PROBES = (("GET", "/ping"), ("GET", "/health"), ("GET", "/ping"))


def serve_once(
    tmp_path: Path,
    log_format: str,
    requests: tuple[tuple[str, str], ...] = _PROBES,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Start `serve`, send `requests` (method, path), stop it with SIGINT; its output lines
    (stdout and stderr: serve writes only logs, to stderr)."""
    process = ServeProcess(
        {
            "LOG_FORMAT": log_format,
            "DATABASE_URL": "sqlite:///data/junjo.db",  # rewritten, with a note
            **(env or {}),
        },
        cwd=tmp_path,
        output=tmp_path / "serve.log",
        # No setting from this machine's environment: the defaults, and ours on top.
        environ={k: v for k, v in os.environ.items() if k not in _SETTING_NAMES},
    )
    with process:
        port = process.start().wait_ready_sync().http_port
        for method, path in requests:
            # /health may answer 503 (no ingestion-service), others 404 or 405: still requests.
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 (http, above)
        process.signal(signal.SIGINT)
        code = process.wait()
    lines = process.lines()
    assert code == 0, "\n".join(lines)
    return lines


def test_json_mode_writes_only_json_objects_under_our_logger_names(tmp_path: Path) -> None:
    lines = serve_once(tmp_path, "json")
    records = [json.loads(line) for line in lines]  # a non-JSON line fails here
    loggers = {str(record["logger"]) for record in records}
    assert all(name.startswith(("junjo_backend", "asyncio")) for name in loggers), loggers
    # Go's log/slog field names, in the order slog writes them, then ours.
    assert all(list(record)[:4] == ["time", "level", "msg", "logger"] for record in records)
    assert {str(record["level"]) for record in records} <= _SLOG_LEVELS
    messages = [str(record["msg"]) for record in records]
    assert "DATABASE_URL: sqlite:// rewritten to sqlite+aiosqlite://" in messages
    # Probes are logged at DEBUG only, so at INFO none of them shows.
    assert not [m for m in messages if "/ping" in m or "/health" in m]


def test_text_mode_is_logfmt(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HTTP_PROT=1324\n")  # a typo: warned about in the log
    lines = serve_once(tmp_path, "text")
    assert lines
    assert [line for line in lines if " level=WARN " in line and "HTTP_PROT" in line] == [
        next(line for line in lines if "HTTP_PROT" in line)
    ]
    assert any(
        'msg=".env: HTTP_PROT is not a setting (did you mean HTTP_PORT?)"' in line for line in lines
    )
    bad = [line for line in lines if not LOGFMT_LINE.match(line)]
    assert not bad
    assert any("logger=junjo_backend.http" in line for line in lines)
    assert all(re.match(r"^time=\S+ level=(DEBUG|INFO|WARN|ERROR) msg=", line) for line in lines)
    assert not any("uvicorn" in line.split(" msg=")[0] for line in lines)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_the_access_log_names_routes_never_paths_or_query_strings(
    tmp_path: Path, level: str
) -> None:
    key = generate_api_key()
    requests = (
        ("GET", f"/health?api_key={key}"),
        ("GET", f"/{key}"),
        ("GET", f"/metrics/{key}?x=1"),
        ("POST", f"/ping?{key}"),
        (key, "/ping"),  # a method is a token: a key can be one
    )
    lines = serve_once(tmp_path, "json", requests, env={"LOG_LEVEL": level})
    assert not [line for line in lines if key[:12] in line or key[-12:] in line]
    access = [json.loads(line) for line in lines if "junjo_backend.http.access" in line]
    shown = [(str(record["level"]), str(record["msg"])) for record in access]
    unknown = [("INFO", "GET unknown route 404"), ("INFO", "GET unknown route 404")]
    if level == "INFO":  # probes and scrapes only at DEBUG
        assert shown == unknown
    else:
        health = [m for _, m in shown if m.startswith("GET /health ")]
        assert health in (["GET /health 200"], ["GET /health 503"])
        assert shown == [
            ("DEBUG", health[0]),
            *unknown,
            ("DEBUG", "POST /ping 405"),
            ("DEBUG", "OTHER /ping 405"),
        ]
    assert all(str(record["client"]).startswith("127.0.0.1:") for record in access)


@pytest.mark.parametrize("value", ["a b", 'say "hi"', "back\\slash", "two\nlines", "", "k=v"])
def test_logfmt_quotes_what_needs_quoting(value: str) -> None:
    from junjo_backend.logs import _logfmt_value  # noqa: PLC0415

    rendered = f"key={_logfmt_value(value)}"
    assert LOGFMT_LINE.match(rendered), rendered
    assert "\n" not in rendered


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
    ],
)
def test_both_formats_carry_the_same_slog_fields(level: int, shown: str) -> None:
    from junjo_backend.logs import JsonFormatter, TextFormatter  # noqa: PLC0415

    record = logging.LogRecord("junjo_backend.x", level, "f.py", 1, "said %s", ("hi",), None)
    record.key_id = "abc"
    as_json = json.loads(JsonFormatter().format(record))
    text = TextFormatter().format(record)
    pairs = dict(pair.split("=", 1) for pair in re.findall(_LOGFMT_PAIR, text))
    assert list(as_json) == list(pairs) == ["time", "level", "msg", "logger", "key_id"]
    assert as_json["level"] == pairs["level"] == shown
    assert as_json["msg"] == "said hi"
    assert pairs["msg"] == '"said hi"'


@pytest.mark.parametrize("value", ["warn", "WARN", "Warning", "warning"])
def test_warn_is_a_log_level(value: str) -> None:
    assert Settings(_env_file=None, log_level=value).log_level == "WARNING"


def test_env_example_holds_the_embedded_defaults(repo_root: Path) -> None:
    example = Settings(_env_file=repo_root / ".env.example")
    defaults = Settings(_env_file=None)
    for name in Settings.model_fields:
        assert getattr(example, name) == getattr(defaults, name), name
