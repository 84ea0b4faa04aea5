"""The README's settings table and the settings object say the same thing."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from junjo_backend.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

_ROW = re.compile(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| ([^|]+) \|", re.MULTILINE)


def readme_defaults(readme: str) -> dict[str, str]:
    """Each variable of the settings table with the default the README gives it."""
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    defaults: dict[str, str] = {}
    for names, values in _ROW.findall(table):
        variables = re.findall(r"`([A-Z_]+)`", names)
        given = [value.strip().strip("`") for value in values.split(",")]
        if len(given) != len(variables):
            given = [values.strip().strip("`")] * len(variables)
        defaults.update(zip(variables, given, strict=True))
    return defaults


def shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_setting_is_in_the_readme_with_its_default(repo_root: Path) -> None:
    documented = readme_defaults((repo_root / "README.md").read_text())
    fields = {name.upper(): field.default for name, field in Settings.model_fields.items()}
    assert sorted(documented) == sorted(fields)
    for name, default in fields.items():
        assert documented[name] == shown(default), name


def test_the_check_reads_a_drifted_table() -> None:
    readme = "## Settings\n\n| variable | default | what |\n|---|---|---|\n"
    readme += "| `HTTP_HOST`, `HTTP_PORT` | `example.invalid`, `1323` | the HTTP API |\n"
    readme += "| `LOG_LEVEL` | `INFO` | how much |\n\n## Next\n"
    assert readme_defaults(readme) == {
        "HTTP_HOST": "example.invalid",
        "HTTP_PORT": "1323",
        "LOG_LEVEL": "INFO",
    }
    assert readme_defaults(readme)["HTTP_HOST"] != shown(Settings.model_fields["http_host"].default)


def test_the_migration_table_names_real_settings_with_their_defaults(repo_root: Path) -> None:
    section = (repo_root / "README.md").read_text().split("## Migrating from the Go backend", 1)[1]
    section = section.split("\n## ", 1)[0]
    ours = [
        row.split(" | ")[-1]
        for row in section.splitlines()
        if row.startswith("| ") and " | " in row
    ]
    named = {name for cell in ours for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}
    fields = {name.upper(): field.default for name, field in Settings.model_fields.items()}
    assert named, "no setting named in the migration table"
    assert named <= set(fields), named - set(fields)
    # A default the table gives right after a setting's name is the real one.
    for name, given in re.findall(r"`([A-Z][A-Z0-9_]+)` `([^`]+)`", section):
        assert given == shown(fields[name]), name
    assert "/dbdata/sqlite/app_data.db" in section
    assert "/dbdata/duckdb/otel_data.db" in section
