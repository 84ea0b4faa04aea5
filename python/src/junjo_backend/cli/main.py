"""`junjo-backend`: run the backend, manage API keys, look at spans.

Every mistake in a setting and every failed start ends in one line on stderr,
`error: ...`, naming the setting, address or path and the reason, and a non-zero exit; the
traceback is added only at `LOG_LEVEL=DEBUG` (console.py has the whole stream contract).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING

from junjo_backend import __version__
from junjo_backend.addresses import parse_address
from junjo_backend.cli.arguments import KeySafeParser, parse_command_line
from junjo_backend.cli.config_command import env_file_warnings
from junjo_backend.cli.console import (
    EXIT_BAD_SETTINGS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CommandError,
    Console,
    UsageError,
)
from junjo_backend.failures import error_line
from junjo_backend.logs import configure_logging
from junjo_backend.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias

log = logging.getLogger(__name__)


def _settings_help() -> str:
    """Every setting with its default and meaning, from the settings' own descriptions."""
    header = (
        "settings (environment variables, or .env in the working folder; any case). The "
        "values below are the defaults, whatever is set here; `junjo-backend config` prints "
        "the values in effect and where each comes from:"
    )
    lines = [header]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"  {name.upper()}={shown}")
        lines.append(f"      {field.description}")
    return "\n".join(lines)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar (its errors never repeat a value that could be a key)."""
    parser = KeySafeParser(prog="junjo-backend", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = KeySafeParser(add_help=False)
    quiet.add_argument(
        "-q", "--quiet", action="store_true", help="no informational lines on stderr"
    )
    _add_serve(commands)
    _add_api_keys(commands, quiet)
    _add_spans(commands, quiet)
    config = commands.add_parser(
        "config",
        parents=[quiet],
        help="print the settings in effect and where each comes from (secrets masked); "
        "exit 2 when one is invalid",
    )
    config.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


# argparse has no public name for what add_subparsers returns.
_Commands: TypeAlias = "argparse._SubParsersAction[KeySafeParser]"  # noqa: SLF001


def _add_serve(commands: _Commands) -> None:
    commands.add_parser(
        "serve",
        help="run the backend until SIGINT or SIGTERM",
        description="Run the auth gRPC server, the span poller and the HTTP API.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_api_keys(commands: _Commands, quiet: KeySafeParser) -> None:
    keys = commands.add_parser("api-keys", help="create, list, check and revoke API keys")
    key_commands = keys.add_subparsers(dest="api_keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser(
        "create", parents=[quiet], help="create a key and print it (only this once) on stdout"
    )
    create.add_argument("name", help="a label for the key, such as the app that will use it")
    create.add_argument(
        "--json", action="store_true", help="print id, name and key as one JSON object"
    )
    listing = key_commands.add_parser(
        "list", parents=[quiet], help="list keys (never prints a full key)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    check = key_commands.add_parser(
        "check",
        parents=[quiet],
        help="read a key on stdin and print its id and name, or exit 1 when it is not stored",
    )
    check.add_argument("--json", action="store_true", help="print the match as a JSON object")
    revoke = key_commands.add_parser("revoke", parents=[quiet], help="delete a key by its id")
    revoke.add_argument("id", help="the key's id, as `list` shows it")
    revoke.add_argument("--json", action="store_true", help="print the revoked id as a JSON object")


def _add_spans(commands: _Commands, quiet: KeySafeParser) -> None:
    spans = commands.add_parser("spans", help="look at spans in the ingestion-service's WAL")
    span_commands = spans.add_subparsers(dest="spans_command", required=True, metavar="ACTION")
    tail = span_commands.add_parser(
        "tail",
        parents=[quiet],
        help="print decoded spans as they arrive, without moving the poller's checkpoint",
    )
    tail.add_argument(
        "--from-start",
        action="store_true",
        help="start at the oldest entry in the WAL (default: after the poller's checkpoint)",
    )
    tail.add_argument(
        "--follow",
        action="store_true",
        help="keep waiting for new spans, and for the ingestion-service through outages",
    )
    tail.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        help="the ingestion-service's internal address (default: INGESTION_GRPC_ADDRESS)",
    )
    tail.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="without --follow, give up when nothing answers for this long (default: 10)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per span")


def _run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    # Imports are deferred so that `api-keys list` does not pay for FastAPI and uvicorn.
    if args.command == "serve":
        from junjo_backend.app import ServeError, serve  # noqa: PLC0415

        try:
            return serve(settings)  # logs the settings' notes once it is ready
        except ServeError as exc:
            for note in settings.notes:
                console.note(note)
            raise CommandError(str(exc)) from exc
    if args.command == "config":
        from junjo_backend.cli.config_command import run_config  # noqa: PLC0415

        return run_config(settings, args, console)
    if args.command == "api-keys":
        from junjo_backend.cli.key_commands import run_api_keys_command  # noqa: PLC0415

        return asyncio.run(run_api_keys_command(settings, args, console))
    from junjo_backend.cli.span_tail import run_tail  # noqa: PLC0415

    return asyncio.run(
        run_tail(
            settings,
            from_start=args.from_start,
            follow=args.follow,
            as_json=args.json,
            out=console.out,
            err=console.err,
            address=args.address,
            timeout=args.timeout,
            quiet=console.quiet,
        )
    )


def _log_level(args: argparse.Namespace, settings: Settings) -> str:
    """The level a command logs at.

    `serve`: LOG_LEVEL. The data commands never log at INFO (compose sets LOG_LEVEL=INFO
    for the server, and a command's output is its data): WARNING, or DEBUG and ERROR when
    LOG_LEVEL asks for them; `-q` keeps only errors.
    """
    if args.command == "serve":
        return settings.log_level
    if getattr(args, "quiet", False):
        return "ERROR"
    return settings.log_level if settings.log_level in {"DEBUG", "ERROR"} else "WARNING"


def _settings(args: argparse.Namespace, console: Console) -> Settings | None:
    """The settings, with logging set up; None (the error written) when one is invalid.

    `.env` keys that are not settings are warned about whatever the outcome: in the log
    for `serve` (its stderr is log lines only), otherwise as `warning:` lines, which `-q`
    keeps.
    """
    warnings = env_file_warnings()
    try:
        settings = get_settings()
    except SettingsError as exc:
        for line in warnings:
            console.warn(line)
        console.finish(str(exc))
        return None
    configure_logging(_log_level(args, settings), settings.log_format)
    for line in warnings:
        if args.command == "serve":
            log.warning(line)
        else:
            console.warn(line)
    if args.command != "serve":
        for note in settings.notes:
            console.note(note)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `junjo-backend` command; returns the exit status."""
    # grpc-core writes its own lines to stderr (`E1128 ... hpack_encoder`), which would break
    # logfmt and one-JSON-object-per-line output. Silenced unless the operator asks for them
    # (GRPC_VERBOSITY=ERROR, or DEBUG with GRPC_TRACE). Set before grpc is first imported.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = parse_command_line(build_parser(), argv)
    console = Console(quiet=getattr(args, "quiet", False))
    debug = os.environ.get("LOG_LEVEL", "").strip().upper() == "DEBUG"
    settings = _settings(args, console)
    if settings is None:
        return EXIT_BAD_SETTINGS
    try:
        status = _run(args, settings, console)
    except CommandError as exc:
        console.finish(str(exc))
        if debug:
            traceback.print_exc(file=console.err)
        return EXIT_BAD_SETTINGS if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        console.finish("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 (the last resort: one line, the traceback at DEBUG)
        console.finish(f"unexpected {error_line(exc)} (LOG_LEVEL=DEBUG shows the traceback)")
        if debug:
            traceback.print_exc(file=console.err)
        return EXIT_FAILED
    console.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
