"""The one logging set-up for the app, the gRPC servers and the poller.

Both formats carry the same fields, named as Go's `log/slog` names them (`time`, `level`
as `DEBUG`/`INFO`/`WARN`/`ERROR`, `msg`), then `logger` and the record's own fields: a
Go operator's queries work on either backend's logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

# Not extras: `message` and `asctime` are set on the record by formatting, and uvicorn
# attaches `color_message` (its message with ANSI colours) to some of its records.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


# slog's level names; CRITICAL is never used here, slog would call it ERROR+4.
_SLOG_LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR+4"}


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, object]:
    """The record's fields, in the order both formats write them."""
    fields: dict[str, object] = {
        "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": _SLOG_LEVELS.get(record.levelname, record.levelname),
        "msg": record.getMessage(),
        "logger": record.name,
    }
    fields.update(_extras(record))
    if record.exc_info:
        fields["exc_info"] = formatter.formatException(record.exc_info)
    return fields


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The fields a caller attached with `extra=`."""
    return {
        name: value
        for name, value in record.__dict__.items()
        if name not in _RESERVED and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, msg, logger, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a JSON line."""
        return json.dumps(_fields(record, self), default=str)


def _logfmt_value(value: object) -> str:
    """A logfmt value: bare when it can be, else double-quoted with escapes."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(char in text for char in ' ="\\\n\r\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


class TextFormatter(logging.Formatter):
    """logfmt: `time=... level=... msg="..." logger=...` then each `extra` field as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one logfmt line."""
        fields = _fields(record, self)
        return " ".join(f"{name}={_logfmt_value(value)}" for name, value in fields.items())


# uvicorn's loggers, renamed so that every line carries one of ours. (uvicorn's access log
# is off: access_log.py writes ours.)
_RENAMED_LOGGERS = {
    "uvicorn": "junjo_backend.http",
    "uvicorn.error": "junjo_backend.http",
    "uvicorn.access": "junjo_backend.http.access",
}


class _RenameLogger(logging.Filter):
    """Give uvicorn's records our logger names (a handler filter: it sees every record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = _RENAMED_LOGGERS.get(record.name, record.name)
        return True


class _BackendHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second call replaces it."""


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send every logger's records to stderr in one format; safe to call more than once."""
    handler = _BackendHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RenameLogger())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BackendHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class LogRateLimit:
    """At most `burst` lines per `every` seconds about one kind of event; the rest counted.

    Call `admit()` once per event: None means leave its line out (it is counted); otherwise
    write the line, with the count returned (the events left out since the last line
    written). A window opens at the first event after the last one has passed. `burst=0`
    leaves every line out: the owner writes a summary of `flush()` on its own schedule.
    """

    def __init__(self, every: float, *, burst: int = 1) -> None:
        self._every = every
        self._burst = burst
        self._opened: float | None = None
        self._admitted = 0
        self._left_out = 0

    def admit(self) -> int | None:
        """Note one event: None to leave its line out, else how many were left out before it."""
        now = time.monotonic()
        if self._opened is None or now - self._opened >= self._every:
            self._opened, self._admitted = now, 0
        if self._admitted >= self._burst:
            self._left_out += 1
            return None
        self._admitted += 1
        return self.flush()

    def flush(self) -> int:
        """How many lines were left out since the last one written; counted as written now."""
        left_out, self._left_out = self._left_out, 0
        return left_out
