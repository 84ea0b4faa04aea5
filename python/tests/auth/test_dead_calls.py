"""Calls that die on the legitimate calls' channel: cancelled by the client, or past their
deadline before the server can answer (a small burst; the flood at scale is
tests/faults/test_auth_deadline_flood.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc
import pytest

from junjo_backend._wire.ingestion import auth_pb2

from .auth_calls import validate

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from junjo_backend._wire.ingestion import auth_pb2_grpc
    from junjo_backend.auth.key_store import NewApiKey

    from .auth_calls import KeyRegistry

    Stub = auth_pb2_grpc.InternalAuthServiceAsyncStub
    MakeKey = Callable[..., Awaitable[NewApiKey]]

DEAD_CALLS = 300
LEGITIMATE_CALLS = 60


async def _dead_call(stub: Stub, key: str, *, cancel: bool) -> None:
    request = auth_pb2.ValidateApiKeyRequest(api_key=key)
    if cancel:
        call = stub.ValidateApiKey(request, timeout=5)
        await asyncio.sleep(0)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await call
        return
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.ValidateApiKey(request, timeout=0.001)


@pytest.mark.parametrize("cancel", [True, False], ids=["client-cancelled", "1ms-deadline"])
async def test_dead_calls_on_the_channel_leave_legitimate_calls_answered(
    stub: Stub,
    make_key: MakeKey,
    used_keys: KeyRegistry,
    caplog: pytest.LogCaptureFixture,
    *,
    cancel: bool,
) -> None:
    """Below the server's pending-call cap, dead calls cost legitimate ones nothing.

    grpc's own per-call DEBUG lines stay off even with the root logger at DEBUG: a flood of
    dead calls must not turn into a flood of log lines.
    """
    key = (await make_key()).key
    caplog.set_level(logging.DEBUG)
    dead = [_dead_call(stub, used_keys.unknown(), cancel=cancel) for _ in range(DEAD_CALLS)]
    legitimate = [validate(stub, key) for _ in range(LEGITIMATE_CALLS)]
    results = await asyncio.gather(*dead, *legitimate, return_exceptions=True)
    answers = results[DEAD_CALLS:]
    assert answers == [True] * LEGITIMATE_CALLS
    assert not [r for r in caplog.records if r.name.startswith("grpc._cython")]
