"""The span store's protocol and the values it reports (the seam the poller and app use).

A store keeps every span the poller drains, in the Go backend's `spans` and
`state_patches` tables, exactly once. See `docs/design/span-store.md`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from junjo_backend.ingestion.spans import SpanRecord


class StoreUnavailable(Exception):  # noqa: N818 (the name is the agreed seam)
    """The store cannot be opened or written; `str()` is one line an operator can read.

    For example `otel_data.db is held by another process (pid 123)`: never SQL, never a
    traceback. The poller does not drain while its store is unavailable.
    """


@dataclass(frozen=True, slots=True)
class StoreWrite:
    """What one `write` did with a batch."""

    stored: int  # span rows added
    patches: int  # state-patch rows added
    set_aside: int  # spans or patches put in the set-aside table
    skipped: int  # records at or below the watermark, or already stored


@dataclass(frozen=True, slots=True)
class StoreStats:
    """The store's totals, for `/health` and `/metrics` (cheap: no query)."""

    spans_stored: int  # rows in `spans` (counted at open, then kept up to date)
    set_aside: int  # rows in the set-aside table
    size_bytes: int | None  # the store's size on disk, None when unknown
    watermark: bytes | None  # the last WAL key the store holds, None when it has none


class SpanStore(Protocol):
    """Where the poller's leader keeps spans. Only the leader opens it."""

    async def open(self) -> None:
        """Open (creating the tables when missing); raises `StoreUnavailable` with the reason."""
        ...

    async def close(self) -> None:
        """Release the store (the leader steps down or stops); closing twice is harmless."""
        ...

    async def watermark(self) -> bytes | None:
        """The last WAL key the store holds, or None (no watermark yet, or a PostgreSQL store).

        None means: resume from the checkpoint. The poller resumes from the earlier of the
        checkpoint and this key.
        """
        ...

    async def write(self, batch: Sequence[SpanRecord], conn: AsyncConnection) -> StoreWrite:
        """Store `batch` (records in key order), called inside the checkpoint's transaction.

        DuckDB commits its own transaction (spans, patches and watermark together) before
        returning, off the event loop; records at or below the watermark are skipped.
        PostgreSQL writes through `conn`, in the checkpoint's transaction. Raises on any
        failure (the batch is then retried), never reports a write that did not commit.
        """
        ...

    def prepare(self, batch: Sequence[SpanRecord]) -> None:
        """A hint: `batch` is likely the next `write`. The store may convert it meanwhile.

        Nothing of it is stored until it is written; a write of another batch ignores it.
        """
        ...

    def stats(self) -> StoreStats:
        """The current totals, without touching the database."""
        ...
