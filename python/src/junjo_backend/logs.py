"""The one logging set-up for the app, the gRPC servers and the poller."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Not extras: `message` and `asctime` are set on the record by formatting, and uvicorn
# attaches `color_message` (its message with ANSI colours) to some of its records.
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The fields a caller attached with `extra=`."""
    return {
        name: value
        for name, value in record.__dict__.items()
        if name not in _RESERVED and not name.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a JSON line."""
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` with `extra` fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one text line plus its `extra` fields."""
        line = super().format(record)
        extras = " ".join(f"{name}={value}" for name, value in _extras(record).items())
        return f"{line} {extras}" if extras else line


class _BackendHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second call replaces it."""


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send every logger's records to stderr in one format; safe to call more than once."""
    handler = _BackendHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BackendHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
