"""Key material where it does not belong: in URLs sent to the HTTP API, as CLI arguments.

The server (at DEBUG, text or JSON logs) gets requests carrying a key in the path, in the
query string, in a known route's parameter and as the method. The CLI gets a key as an
argument of each command, as a key's name, as an id, inside an option, and a database
password holding '@' and '/' (not percent-encoded) in DATABASE_URL. Every output goes to the
suite's folder and every key and password to its registry: the end-of-run scan holds that
no 12 characters of any of them are ever written.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from junjo_backend.auth.key_store import generate_api_key

from .net_helpers import running_backend

if TYPE_CHECKING:
    from .conftest import FaultKit

STRAY_KEYS = 8


def _requests(key: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/health?api_key={key}"),
        ("GET", f"/{key}"),
        ("GET", f"/metrics?{key}"),
        ("GET", f"/otel/trace/{key}/nested-spans"),
        ("POST", f"/ping?x-junjo-api-key={key}"),
        (key, "/ping"),
    ]


def _send(base: str, method: str, path: str) -> int:
    request = urllib.request.Request(base + path, method=method)  # noqa: S310 (http, loopback)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _cli(kit: FaultKit, env: dict[str, str], *argv: str) -> int:
    with kit.output.path("cli-secrets").open("wb") as out:
        return subprocess.run(
            [sys.executable, "-m", "junjo_backend", *argv],
            env={**kit.log_env(), **env},
            cwd=kit.folder,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=90,
            check=False,
        ).returncode


def _cli_arguments(key: str) -> list[tuple[str, ...]]:
    return [
        ("api-keys", "check", key),
        ("spans", "tail", key),
        ("api-keys", "revoke", key),
        ("api-keys", "create", key),
        ("api-keys", "create", f"app {key}"),
        ("api-keys", "list", f"--json={key}"),
        ("config", key),
    ]


async def test_keys_in_urls_and_arguments_are_never_written(kit: FaultKit) -> None:
    url = kit.sqlite_url()
    stored = await kit.store_keys(url, 2)
    strays = [generate_api_key() for _ in range(STRAY_KEYS)]
    for key in strays:
        kit.keys.add(key)
    statuses: dict[int, int] = {}
    with running_backend(kit, "serve-secrets-in-urls") as backend:
        for key in [*stored, *strays]:
            for method, path in _requests(key):
                status = _send(backend.http_url, method, path)
                statuses[status] = statuses.get(status, 0) + 1
    requests = sum(statuses.values())

    exits: dict[int, int] = {}
    env = {"DATABASE_URL": url}
    for key in [stored[0], strays[0]]:
        for argv in _cli_arguments(key):
            status = _cli(kit, env, *argv)
            exits[status] = exits.get(status, 0) + 1
    password = f"p@ss/{secrets.token_urlsafe(12)}"
    kit.keys.add_password(password)
    bad_url = {"DATABASE_URL": f"postgresql://junjo:{password}@127.0.0.1:1/junjo"}
    for argv in (("serve",), ("api-keys", "list"), ("config",)):
        status = _cli(kit, bad_url, *argv)
        exits[status] = exits.get(status, 0) + 1
    runs = sum(exits.values())

    # Every command line above is refused as a usage error or a bad setting.
    assert exits == {2: runs}, exits
    assert set(statuses) <= {200, 400, 404, 405, 503}, statuses  # 400: not a trace id
    kit.table.add(
        "keys in URLs (path, query, route parameter, method) and as CLI arguments; a raw "
        "'@' password in DATABASE_URL",
        f"{requests} requests, {runs} CLI runs",
        f"HTTP {dict(sorted(statuses.items()))}; every CLI run exit 2; output scanned at the end",
    )
