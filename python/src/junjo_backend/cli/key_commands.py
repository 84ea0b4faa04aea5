"""`junjo-backend api-keys create|list|check|revoke`: the key store's command line.

Output follows console.py's stream contract: the key, the listing or the JSON on stdout,
everything else on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from junjo_backend.auth.key_store import (
    API_KEY_HEADER,
    ApiKeyInfo,
    ApiKeyStoreError,
    create_api_key,
    find_api_key,
    key_name_problem,
    list_api_keys,
    looks_like_api_key,
    revoke_api_key,
)
from junjo_backend.cli.console import CommandError, UsageError, open_command_database
from junjo_backend.database import close_engine
from junjo_backend.invocation import cli_command

if TYPE_CHECKING:
    import argparse

    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.cli.console import Console
    from junjo_backend.settings import Settings


def _as_json(info: ApiKeyInfo) -> dict[str, str]:
    return {
        "id": info.id,
        "name": info.name,
        "created_at": info.created_at.isoformat(),
        "key_hint": info.key_hint,
    }


def _listing_table(keys: list[ApiKeyInfo]) -> str:
    header = ("ID", "NAME", "CREATED (UTC)", "KEY HINT")
    rows = [(k.id, k.name, k.created_at.strftime("%Y-%m-%d %H:%M:%S"), k.key_hint) for k in keys]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in [header, *rows]
    )


async def _create(engine: AsyncEngine, args: argparse.Namespace, console: Console) -> None:
    if any(info.name == args.name.strip() for info in await list_api_keys(engine)):
        console.warn(f"another API key is already named {args.name.strip()!r}")
    new = await create_api_key(engine, args.name)
    if args.json:
        console.data(
            json.dumps({"id": new.id, "name": new.name, "key": new.key, "header": API_KEY_HEADER})
            + "\n"
        )
    else:
        console.data(new.key + "\n")
    console.note(
        f"created API key {new.name!r} (id {new.id}); it is shown only now. Clients send it in "
        f"the gRPC metadata header {API_KEY_HEADER} "
        f"(OTEL_EXPORTER_OTLP_HEADERS={API_KEY_HEADER}=<key>)"
    )


async def _list(engine: AsyncEngine, args: argparse.Namespace, console: Console) -> None:
    keys = await list_api_keys(engine)
    if args.json:
        console.data(json.dumps([_as_json(info) for info in keys]) + "\n")
    elif keys:
        console.data(_listing_table(keys))
    else:
        console.note(f"no API keys; create one with: {cli_command()} api-keys create NAME")


async def _check(engine: AsyncEngine, args: argparse.Namespace, console: Console) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        raise CommandError("api-keys check reads the key on stdin, and it was empty")
    info = await find_api_key(engine, key)
    if info is None:
        console.note("no stored API key matches")
        return 1
    if args.json:
        console.data(json.dumps(_as_json(info)) + "\n")
    else:
        console.data(f"{info.id}\t{info.name}\n")
    return 0


async def _revoke(
    engine: AsyncEngine, args: argparse.Namespace, console: Console, settings: Settings
) -> None:
    if not await revoke_api_key(engine, args.id):
        # Never the id as given: it may be anything pasted, a key among them.
        raise CommandError(f"no API key has that id (see: {cli_command()} api-keys list)")
    if args.json:
        console.data(json.dumps({"id": args.id, "revoked": True}) + "\n")
    console.note(
        f"revoked API key {args.id}: the auth server refuses it within "
        f"{settings.api_key_cache_max_age_seconds:g} s; an ingestion-service that accepted it "
        "keeps it cached for up to an hour (restart it to cut the key off at once)"
    )


def _refuse_key_shaped_arguments(args: argparse.Namespace) -> None:
    """A name that cannot be one, or a key given as an id: exit 2, repeating none of it."""
    if args.api_keys_command == "create":
        problem = key_name_problem(args.name)
        if problem is not None:
            raise UsageError(problem)
    if args.api_keys_command == "revoke" and looks_like_api_key(args.id):
        raise UsageError(
            "that is an API key, not a key's id (not repeated here); `api-keys list` shows "
            "the ids, and `api-keys check` reads a key on stdin and names its id"
        )


async def run_api_keys_command(
    settings: Settings, args: argparse.Namespace, console: Console
) -> int:
    """Run one `api-keys` action; returns the exit status (errors raise `CommandError`)."""
    action = args.api_keys_command
    _refuse_key_shaped_arguments(args)
    # Only `create` makes a database; `revoke` writes to one that must exist already.
    engine = await open_command_database(
        settings, console, create=action == "create", writes=action == "revoke"
    )
    try:
        if action == "create":
            await _create(engine, args, console)
        elif action == "list":
            await _list(engine, args, console)
        elif action == "check":
            return await _check(engine, args, console)
        else:
            await _revoke(engine, args, console, settings)
    except (ApiKeyStoreError, ValueError) as exc:  # ValueError: a blank name
        raise CommandError(str(exc)) from None
    finally:
        await close_engine(engine, quiet=True)
    return 0
