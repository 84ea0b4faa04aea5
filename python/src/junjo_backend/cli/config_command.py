"""`junjo-backend config`, and the check of `.env` that every command runs.

`config` prints the effective settings on stdout, each with where it came from (the
environment, `.env`, or the default), secrets masked (fields marked `SECRET`/`SECRET_URL`
in settings.py, and `SecretStr` fields). A setting that does not validate exits 2 before
anything is printed, as every command does (main.py), like the Collector's `validate`.

`.env` is checked because a typo there (`HTTP_PROT=...`) is otherwise ignored in silence:
one warning per key that is not a setting, naming the closest one. The environment is not
checked: it holds every other program's variables too.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import dotenv_values
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from junjo_backend.auth.key_store import looks_like_api_key
from junjo_backend.settings import SECRET, SECRET_URL, Settings

if TYPE_CHECKING:
    import argparse

    from junjo_backend.cli.console import Console

_ENV_FILE = ".env"
_MASK = "***"


def _env_file_keys(env_file: Path) -> list[str]:
    if not env_file.is_file():
        return []
    try:
        return list(dotenv_values(env_file))
    except (OSError, UnicodeDecodeError):  # pydantic-settings reports an unreadable .env
        return []


def env_file_warnings(env_file: Path = Path(_ENV_FILE)) -> list[str]:
    """One line per key of `env_file` that is not a setting, naming the closest setting."""
    names = [name.upper() for name in Settings.model_fields]
    lines = []
    for key in _env_file_keys(env_file):
        if key.upper() in names:
            continue
        if looks_like_api_key(key):  # a pasted key on a line of its own: never repeated
            lines.append(f"{env_file}: a line is not a setting (it looks like an API key)")
            continue
        close = difflib.get_close_matches(key.upper(), names, n=1)
        hint = f"did you mean {close[0]}?" if close else "see `serve --help` for the settings"
        lines.append(f"{env_file}: {key} is not a setting ({hint})")
    return lines


def _source(name: str, env_file_keys: set[str]) -> str:
    upper = name.upper()
    if any(key.upper() == upper for key in os.environ):
        return "environment"
    return ".env" if upper in env_file_keys else "default"


def shown_value(name: str, value: object) -> str:
    """`value` of setting `name` as a report may show it: secrets masked."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    marker = extra.get("secret")
    if isinstance(value, SecretStr) or marker == SECRET:
        return _MASK if value else ""
    if marker == SECRET_URL and isinstance(value, str):
        return make_url(value).render_as_string(hide_password=True)
    return str(value).lower() if isinstance(value, bool) else str(value)


def settings_report(settings: Settings) -> list[dict[str, str]]:
    """Every setting: its name (as an environment variable), shown value and source."""
    env_file_keys = {key.upper() for key in _env_file_keys(Path(_ENV_FILE))}
    return [
        {
            "name": name.upper(),
            "value": shown_value(name, getattr(settings, name)),
            "source": _source(name, env_file_keys),
        }
        for name in Settings.model_fields
    ]


def run_config(settings: Settings, args: argparse.Namespace, console: Console) -> int:
    """Print the report on stdout: `NAME=value  (source)` lines, or a JSON array."""
    report = settings_report(settings)
    if args.json:
        console.data(json.dumps(report) + "\n")
        return 0
    width = max(len(f"{row['name']}={row['value']}") for row in report)
    console.data(
        "".join(
            f"{row['name'] + '=' + row['value']:<{width}}  ({row['source']})\n" for row in report
        )
    )
    return 0
