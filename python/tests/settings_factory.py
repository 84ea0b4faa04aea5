"""The one way tests make `Settings`: loopback, nothing dialled by accident, no environment.

`Settings.model_validate` reads neither the environment nor a `.env` file, so a test's
settings are what it says and nothing the machine happens to hold.
"""

from __future__ import annotations

from junjo_backend.settings import Settings

# Ephemeral loopback ports for what we serve; port 1 on loopback for the ingestion-service,
# where nothing listens (a test that needs one passes its address).
BASE: dict[str, object] = {
    "auth_grpc_listen_address": "127.0.0.1:0",
    "ingestion_grpc_address": "127.0.0.1:1",
}


def backend_settings(database_url: str, /, **overrides: object) -> Settings:
    """Settings on `database_url`, BASE, then `overrides` on top (a `database_url` too)."""
    return Settings.model_validate({**BASE, "database_url": database_url, **overrides})
