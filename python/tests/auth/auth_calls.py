"""How the auth tests call the server and keep track of the keys they used."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc
from junjo_backend.auth.key_store import generate_api_key
from junjo_backend.auth.known_keys import DEFAULT_MISS_REFRESH_AFTER_SECONDS

if TYPE_CHECKING:
    import grpc

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING

# Long enough for a miss to refresh the snapshot however recently it was read, so a key
# stored just before is found (the server's own rule, not a guess about timing).
MISS_FLOOR_PASSED = DEFAULT_MISS_REFRESH_AFTER_SECONDS * 1.5

# Keys shorter than this are test vocabulary ("nope"), not key material worth hunting for.
_MIN_TRACKED_KEY = 16
# A key's first or last this many characters count as key material too (a logged "hint" or
# prefix leaks as surely as the key); 8 random base62 characters never turn up by chance.
_TELLTALE_CHARS = 8


class KeyRegistry:
    """Every key a test used, valid or not, so the session can check no log shows one."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, key: str) -> str:
        """Remember `key` and return it."""
        if len(key) >= _MIN_TRACKED_KEY:
            self.keys.add(key)
        return key

    def unknown(self) -> str:
        """A fresh key shaped like a real one that no database holds."""
        return self.add(generate_api_key())

    def found_in(self, text: str) -> bool:
        """Whether any remembered key, or its first or last characters, occurs in `text`."""
        return any(
            key[:_TELLTALE_CHARS] in text or key[-_TELLTALE_CHARS:] in text for key in self.keys
        )


def auth_stub(channel: grpc.aio.Channel) -> auth_pb2_grpc.InternalAuthServiceAsyncStub:
    """The generated client stub on `channel`."""
    return auth_pb2_grpc.InternalAuthServiceStub(channel)


async def validate(stub: auth_pb2_grpc.InternalAuthServiceAsyncStub, key: str) -> bool:
    """One ValidateApiKey call, with a deadline like the ingestion-service's."""
    request = auth_pb2.ValidateApiKeyRequest(api_key=key)
    return (await stub.ValidateApiKey(request, timeout=5)).is_valid


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    """The grpc.health.v1 status of `service` ("" is the whole server)."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    status: int = response.status
    return status
