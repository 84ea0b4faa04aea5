"""Which span store a deployment gets (`SPAN_STORE`), built in one place; its `/health` part.

`Settings.span_store_kind` has already decided `auto` and refused the combinations that
cannot work (`duckdb` with PostgreSQL, `database` with SQLite). This module turns the kind
into a store object the poller opens once it leads (poller/loop.py). The PostgreSQL store
(issue 19) plugs in at `build_span_store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime  # noqa: TC003 (pydantic needs it at run time)
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from junjo_backend.database import sqlite_file
from junjo_backend.ingestion.spans import ulid_time

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from junjo_backend.poller.loop import SpanPoller
    from junjo_backend.settings import Settings
    from junjo_backend.store.base import SpanStore


class StoreNotBuilt(Exception):  # noqa: N818 (reads as what happened)
    """The chosen span store is not in this build; the message is one line."""


@dataclass(frozen=True, slots=True)
class StoreChoice:
    """The span store of this deployment: its kind, the object, where it keeps spans."""

    kind: Literal["duckdb", "database", "none"]
    store: SpanStore | None  # None: count only (SPAN_STORE=none)
    location: str | None  # the DuckDB file, for the operator


def duckdb_file(settings: Settings) -> Path:
    """`SPAN_STORE_DUCKDB_PATH`, a relative path taken from the SQLite database's folder."""
    path = Path(settings.span_store_duckdb_path).expanduser()
    if path.is_absolute():
        return path
    database = sqlite_file(settings.database_url)
    folder = database.parent if database is not None else Path.cwd()
    return folder / path


def build_span_store(settings: Settings, engine: AsyncEngine | None = None) -> StoreChoice:
    """The store `SPAN_STORE` asks for (nothing is opened here: only the leader opens it).

    The PostgreSQL store writes through the poller's connections and reads through `engine`
    (the backend's), which it needs.
    """
    kind = settings.span_store_kind
    if kind == "duckdb":
        from junjo_backend.store.duckdb_store import DuckDBStore  # noqa: PLC0415 (duckdb loads only when used)

        path = duckdb_file(settings)
        store = DuckDBStore(path, memory_limit=settings.span_store_duckdb_memory_limit)
        return StoreChoice(kind, store, str(path))
    if kind == "database":
        if engine is None:
            raise StoreNotBuilt("database: the PostgreSQL span store needs the backend's engine")
        from junjo_backend.store.postgres_store import PostgresStore  # noqa: PLC0415

        return StoreChoice(kind, PostgresStore(engine), None)
    return StoreChoice(kind, None, None)


class SpanStoreHealth(BaseModel):
    """The `/health` section `span_store`: where spans go and how the store is doing."""

    # bytes (the watermark) go into JSON as hex.
    model_config = ConfigDict(frozen=True, ser_json_bytes="hex")

    kind: Literal["duckdb", "database", "none"] = Field(
        description="SPAN_STORE as resolved; none keeps nothing"
    )
    location: str | None = Field(description="the DuckDB file; null for other kinds")
    open: bool = Field(description="this replica holds the store open (only its leader does)")
    error: str | None = Field(description="why the store could not be opened at the last try")
    spans_stored: int | None = Field(description="rows in spans; null without a store")
    set_aside: int | None = Field(description="spans the store set aside (bad input)")
    size_bytes: int | None = Field(description="the store's size on disk; null when unknown")
    watermark: bytes | None = Field(description="the last WAL key the store holds (hex)")
    watermark_received_at: datetime | None = Field(
        description="when the ingestion-service received the watermark's span"
    )


def span_store_health(choice: StoreChoice, poller: SpanPoller | None) -> SpanStoreHealth:
    """The store's section of `/health`, from state the store and the poller keep."""
    store = choice.store
    if store is None:
        return SpanStoreHealth(
            kind=choice.kind,
            location=choice.location,
            open=False,
            error=None,
            spans_stored=None,
            set_aside=None,
            size_bytes=None,
            watermark=None,
            watermark_received_at=None,
        )
    totals = store.stats()
    watermark = totals.watermark
    return SpanStoreHealth(
        kind=choice.kind,
        location=choice.location,
        open=poller is not None and poller.store_open,
        error=None if poller is None else poller.store_error,
        spans_stored=totals.spans_stored,
        set_aside=totals.set_aside,
        size_bytes=totals.size_bytes,
        watermark=watermark,
        watermark_received_at=None if watermark is None else ulid_time(watermark),
    )
