"""Who may read the span routes: decided by HTTP_HOST alone, tested on a served backend.

The backend listens on 0.0.0.0 (not loopback) and the test connects through 127.0.0.1: the
client's loopback address must not open anything.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
import pytest

from junjo_backend.auth.key_store import create_api_key
from junjo_backend.database import close_engine, open_database
from junjo_backend.settings import Settings
from tests.store.golden_api import expected_rows, fill_postgres

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.serve_process import ServeProcess

    Start = Callable[[dict[str, str]], ServeProcess]

TOKEN = "span-api-token-for-tests-7f3a9c"  # noqa: S105 (a test value)
ROUTE = "/otel/span-service-names"
GOLDEN_SERVICES = ["NO_SERVICE_NAME", "svc-0", "svc-1", "svc-2", "svc-a", "svc-b", "svc-bad"]


def _http_port(process: ServeProcess) -> int:
    port = process.wait_ready_sync().wait_for("junjo-backend ready")["http_port"]
    assert isinstance(port, int)
    return port


def _ingestion_key(database_url: str) -> str:
    async def make() -> str:
        engine = await open_database(database_url)
        try:
            return (await create_api_key(engine, "an app that writes spans")).key
        finally:
            await close_engine(engine)

    return asyncio.run(make())


def _get(port: int, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(f"http://127.0.0.1:{port}{ROUTE}", headers=headers, timeout=10)


def _granted(response: httpx.Response) -> bool:
    """The request got past the access check: the golden store's service names came back."""
    return response.status_code == 200 and response.json() == GOLDEN_SERVICES


@pytest.fixture
async def store_url(postgres_url: str) -> str:
    """A PostgreSQL database holding the golden spans (every replica reads it)."""
    await fill_postgres(postgres_url, expected_rows())
    return postgres_url


def _on(url: str, **env: str) -> dict[str, str]:
    return {"DATABASE_URL": url, "SPAN_STORE": "database", "POLLER_ENABLED": "false", **env}


def test_without_a_token_a_non_loopback_host_closes_the_routes(
    serve_process: Start, store_url: str
) -> None:
    key = _ingestion_key(store_url)
    process = serve_process(_on(store_url, HTTP_HOST="0.0.0.0"))  # noqa: S104
    port = _http_port(process)
    closed = process.wait_for("span API (/otel/...) closed")
    assert closed["level"] in {"WARN", "WARNING"}
    assert "SPAN_API_TOKEN is not set" in str(closed["msg"])

    for authorization in (None, f"Bearer {key}", f"Bearer {TOKEN}", "Bearer"):
        response = _get(port, authorization)
        assert response.status_code == 403, authorization
        assert set(response.json()) == {"error"}
        assert "SPAN_API_TOKEN is not set" in response.json()["error"]
    assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=10).text == "pong"


def test_with_a_token_only_that_token_opens_them(serve_process: Start, store_url: str) -> None:
    key = _ingestion_key(store_url)
    env = _on(store_url, HTTP_HOST="0.0.0.0", SPAN_API_TOKEN=TOKEN, LOG_LEVEL="DEBUG")  # noqa: S104
    process = serve_process(env)
    port = _http_port(process)
    process.wait_for("span API (/otel/...) needs `Authorization: Bearer <SPAN_API_TOKEN>`")

    refused = {
        "no header": None,
        "a wrong token": "Bearer not-the-token",
        "the token as a prefix": f"Bearer {TOKEN}x",
        "an ingestion API key": f"Bearer {key}",
        "another scheme": f"Basic {TOKEN}",
        "no scheme": TOKEN,
    }
    for case, authorization in refused.items():
        response = _get(port, authorization)
        assert response.status_code == 401, case
        assert response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()) == {"error"}, case

    for authorization in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
        assert _granted(_get(port, authorization)), authorization
    assert not any(TOKEN in line for line in process.lines()), "the token was logged"


def test_a_loopback_host_leaves_them_open(serve_process: Start, store_url: str) -> None:
    process = serve_process(_on(store_url, HTTP_HOST="127.0.0.1"))
    port = _http_port(process)
    process.wait_for("span API (/otel/...) open: HTTP_HOST=127.0.0.1 is loopback")
    assert _granted(_get(port, None))


def test_the_token_is_masked_wherever_settings_are_shown() -> None:
    settings = Settings(span_api_token=TOKEN, _env_file=None)
    assert settings.span_api_token is not None
    assert settings.span_api_token.get_secret_value() == TOKEN
    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
    ):
        assert TOKEN not in shown
    # An empty value (`SPAN_API_TOKEN=` in a .env) is no token, not one anybody could send.
    assert Settings(span_api_token="  ", _env_file=None).span_api_token is None  # noqa: S106
