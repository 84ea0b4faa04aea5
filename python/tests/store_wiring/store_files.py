"""Filling a WAL with the Go peer's walseed, and reading a DuckDB store file back.

Shared by the store tests and the fault suite. A store file can be read only while no
other process holds it (DuckDB lets one process open a file, even for reading).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb

from harness.go_tools import go_tool

if TYPE_CHECKING:
    from pathlib import Path

# Junjo-shaped traces from walseed: a workflow span and 4 nodes, 2 set_state events a node.
SPANS_PER_TRACE = 5
PATCHES_PER_TRACE = 8


@dataclass(frozen=True, slots=True)
class Seeded:
    """What one walseed run wrote."""

    count: int
    first_key: bytes
    last_key: bytes


def walseed(wal_dir: Path, *args: str) -> Seeded:
    """Run walseed (built from its sources) on `wal_dir`; the peer must not have it open."""
    done = subprocess.run(
        [str(go_tool("walseed", rebuild=True)), "-path", str(wal_dir), *args],
        capture_output=True,
        check=True,
        text=True,
        timeout=120,
    )
    answer = json.loads(done.stdout)
    return Seeded(
        int(answer["count"]), bytes.fromhex(answer["first_key"]), bytes.fromhex(answer["last_key"])
    )


def junjo_traces(wal_dir: Path, traces: int) -> Seeded:
    """`traces` Junjo-shaped traces (5 spans, 8 state patches each)."""
    return walseed(wal_dir, "-count", str(traces * SPANS_PER_TRACE), "-shape", "junjo")


@dataclass(frozen=True, slots=True)
class StoreRows:
    """What a DuckDB store file holds."""

    spans: int
    distinct_spans: int
    patches: int
    set_aside: int
    watermark: bytes | None


def store_rows(path: Path) -> StoreRows:
    """Read the file (nothing else may hold it)."""
    with contextlib.closing(duckdb.connect(str(path), read_only=True)) as db:

        def one(sql: str) -> object:
            row = db.execute(sql).fetchone()
            assert row is not None
            return row[0]

        tables = {row[0] for row in db.execute("SHOW TABLES").fetchall()}
        watermark = None
        if "junjo_store_watermark" in tables:
            found = db.execute("SELECT last_key FROM junjo_store_watermark").fetchone()
            watermark = None if found is None else bytes(found[0])
        return StoreRows(
            spans=int(str(one("SELECT count(*) FROM spans"))),
            distinct_spans=int(str(one("SELECT count(DISTINCT (trace_id, span_id)) FROM spans"))),
            patches=int(str(one("SELECT count(*) FROM state_patches"))),
            set_aside=int(str(one("SELECT count(*) FROM junjo_spans_set_aside"))),
            watermark=watermark,
        )
