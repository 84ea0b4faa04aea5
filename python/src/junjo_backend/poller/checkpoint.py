"""The poller's checkpoint: the last processed WAL key, in `poller_state` (the Go layout).

One row, id 1, `last_key` a BLOB, as the Go backend kept it, so a database either backend
wrote resumes where the other stopped. The poller writes it in the same transaction as its
sink's writes (loop.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import insert, select, update

from junjo_backend.database import poller_state

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

_CHECKPOINT_ROW = 1


async def load_checkpoint(conn: AsyncConnection) -> bytes | None:
    """The key of the last WAL entry the poller has processed, or None before the first batch."""
    result = await conn.execute(
        select(poller_state.c.last_key).where(poller_state.c.id == _CHECKPOINT_ROW)
    )
    key = result.scalar_one_or_none()
    return bytes(key) if key else None


async def save_checkpoint(conn: AsyncConnection, last_key: bytes) -> None:
    """Record `last_key` as processed, within the caller's transaction."""
    result = await conn.execute(
        update(poller_state).where(poller_state.c.id == _CHECKPOINT_ROW).values(last_key=last_key)
    )
    if result.rowcount == 0:
        await conn.execute(insert(poller_state).values(id=_CHECKPOINT_ROW, last_key=last_key))
