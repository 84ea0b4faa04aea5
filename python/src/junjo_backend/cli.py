"""`junjo-backend`: run the backend, manage API keys, look at spans."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from junjo_backend.logs import configure_logging
from junjo_backend.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="junjo-backend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the backend until SIGINT or SIGTERM")

    keys = commands.add_parser("api-keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="api_keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name", help="a label for the key, such as the app that will use it")
    key_commands.add_parser("list", help="list keys (never prints a full key)")
    revoke = key_commands.add_parser("revoke", help="delete a key by its id")
    revoke.add_argument("id", help="the key's id, as `list` shows it")

    spans = commands.add_parser("spans", help="look at spans in the ingestion-service's WAL")
    span_commands = spans.add_subparsers(dest="spans_command", required=True, metavar="ACTION")
    tail = span_commands.add_parser(
        "tail", help="print decoded spans as they arrive, without moving the poller's checkpoint"
    )
    start = tail.add_mutually_exclusive_group()
    start.add_argument(
        "--from-start", action="store_true", help="start at the oldest entry in the WAL"
    )
    start.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="start after the poller's checkpoint (the default)",
    )
    tail.add_argument("--follow", action="store_true", help="keep waiting for new spans")
    tail.add_argument("--json", action="store_true", help="one JSON object per span")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `junjo-backend` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    # Imports are deferred so that `api-keys list` does not pay for FastAPI and uvicorn.
    if args.command == "serve":
        from junjo_backend.app import serve  # noqa: PLC0415

        return serve(settings)
    if args.command == "api-keys":
        from junjo_backend.api_keys import run_api_keys_command  # noqa: PLC0415

        return asyncio.run(run_api_keys_command(settings, args, sys.stdout))
    from junjo_backend.span_tail import run_tail  # noqa: PLC0415

    return asyncio.run(
        run_tail(
            settings,
            from_start=args.from_start,
            follow=args.follow,
            as_json=args.json,
            out=sys.stdout,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
