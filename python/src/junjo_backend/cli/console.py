"""What the CLI says, and where: data on stdout, `error: ...` and notes on stderr.

The stream contract of every command: stdout carries only the data (a key, a listing, JSON),
so scripts can read it. On failure the first line of stderr is `error: ...`, one line that
names the setting, address or path and the reason; a traceback is added only at
`LOG_LEVEL=DEBUG`. Informational lines (which database was used, a rewritten URL) go to
stderr after the error, or alone on success; `-q` silences them.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from sqlalchemy.exc import SQLAlchemyError

from junjo_backend.database import (
    close_engine,
    create_engine,
    database_label,
    init_schema,
    sqlite_file,
    sqlite_write_problem,
)
from junjo_backend.failures import describe_error
from junjo_backend.invocation import cli_command

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.settings import Settings

# The exit statuses every command shares (a command's own outcomes, such as `api-keys check`
# finding no key, are 0 and 1 as well).
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
# 128 + SIGINT, as a shell reports a command ended by Ctrl-C.
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A command failed for a reason the operator can act on; the message is one line."""


class UsageError(CommandError):
    """The command line itself is wrong (exit 2, as for a bad setting); one line."""


@dataclass(slots=True)
class Console:
    """The two streams of a command, with the notes held back until the outcome is known."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    _notes: list[str] = field(default_factory=list)

    def data(self, text: str) -> None:
        """Write `text` (data for scripts) to stdout."""
        self.out.write(text)
        self.out.flush()

    def note(self, line: str) -> None:
        """Keep an informational line for stderr (written by `finish`)."""
        self._notes.append(line)

    def warn(self, line: str) -> None:
        """Keep a warning for stderr; unlike a note, `-q` does not silence it."""
        self._notes.append(f"warning: {line}")

    def finish(self, error: str | None = None) -> None:
        """Write `error: ...` first when there is one, then the notes (unless quiet)."""
        if error is not None:
            self.err.write(f"error: {error}\n")
        for line in self._notes:
            if not self.quiet or line.startswith("warning: "):
                self.err.write(f"{line}\n")
        self._notes.clear()
        self.err.flush()


async def open_command_database(
    settings: Settings, console: Console, *, create: bool, writes: bool = False
) -> AsyncEngine:
    """An engine on the configured database, checked by one connection.

    With `create` false (every command but `api-keys create`) a missing SQLite file is an
    error and nothing is made (a write would leave an empty database mid-restore). A command
    that `writes` or creates is refused first when this uid cannot write the file or its
    folder. The database used is noted on stderr in one line.
    """
    label = database_label(settings.database_url)
    console.note(f"database: {label}")
    path = sqlite_file(settings.database_url)
    if path is not None and not create and not path.exists():
        raise CommandError(
            f"DATABASE_URL: no database at {path} (`{cli_command()} serve` or "
            "`api-keys create` makes one; run from the folder the server runs in, or set "
            "DATABASE_URL to an absolute path)"
        )
    problem = sqlite_write_problem(settings.database_url) if create or writes else None
    if problem is not None:
        raise CommandError(f"DATABASE_URL: {problem}")
    try:
        engine = create_engine(
            settings.database_url,
            connect_timeout_seconds=settings.database_connect_timeout_seconds,
            create_missing=create,
        )
    except OSError as exc:
        folder = path.parent if path is not None else label
        raise CommandError(
            f"DATABASE_URL: cannot create the folder {folder}: {exc.strerror or exc}"
        ) from None
    try:
        async with asyncio.timeout(settings.database_connect_timeout_seconds):
            if create:
                await init_schema(engine)
            else:
                async with engine.connect():
                    pass
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        await close_engine(engine, quiet=True)
        reason = (
            f"no answer within {settings.database_connect_timeout_seconds:g} s "
            "(DATABASE_CONNECT_TIMEOUT_SECONDS)"
            if isinstance(exc, TimeoutError)
            else describe_error(exc)
        )
        raise CommandError(f"database {label} unavailable: {reason}") from None
    return engine
