"""The golden cases (golden/README.md) and reading a store file back in their format."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from junjo_backend.ingestion.spans import SpanRecord

GOLDEN = Path(__file__).parent / "golden"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_COLUMNS = {"start_time", "end_time", "event_time"}


def batches() -> list[list[SpanRecord]]:
    """Every golden batch, in order (batch N is item N - 1)."""
    out = []
    for line in (GOLDEN / "batches.jsonl").read_text().splitlines():
        records = json.loads(line)["records"]
        out.append(
            [
                SpanRecord(
                    base64.b64decode(r["key"]),
                    base64.b64decode(r["span"]),
                    base64.b64decode(r["resource"]),
                )
                for r in records
            ]
        )
    return out


def expected(name: str) -> list[dict[str, Any]]:
    """An expected-*.jsonl file's rows."""
    return [json.loads(line) for line in (GOLDEN / name).read_text().splitlines()]


def _time(micros: int) -> str:
    return (EPOCH + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_table(path: Path, table: str, columns: list[str]) -> list[dict[str, Any]]:
    """`columns` of every row of `table` in the file, times as the golden files write them."""
    select = ", ".join(f"epoch_us({c})" if c in TIME_COLUMNS else c for c in columns)
    with duckdb.connect(str(path), read_only=True) as db:
        rows = db.execute(f"SELECT {select} FROM {table}").fetchall()  # noqa: S608 (test's own names)
    return [
        {c: _time(v) if c in TIME_COLUMNS else v for c, v in zip(columns, row, strict=True)}
        for row in rows
    ]


def canonical(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as sorted JSON lines, to compare tables whatever their row order."""
    return sorted(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows)
