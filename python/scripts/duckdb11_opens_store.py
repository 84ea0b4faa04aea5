"""Check that DuckDB 1.1 (the Go backend's) opens, reads and writes a file our store made.

    uv run --no-sync python python/scripts/duckdb11_opens_store.py

Stores every golden batch into a new file with `DuckDBStore`, then, in a throwaway
environment with duckdb 1.1.3 from PyPI (`uv run --no-project --with duckdb==1.1.3`),
opens the file, counts its rows and inserts one (as the Go backend would). Needs PyPI;
prints the figures and exits 1 when DuckDB 1.1 cannot use the file.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.store.duckdb_store import DuckDBStore

# Run as a file: the golden cases are in python/tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.store.golden import batches

DUCKDB_1_1 = "duckdb==1.1.3"
READER = """
import duckdb, json, sys
db = duckdb.connect(sys.argv[1])
spans = db.execute("SELECT count(*) FROM spans").fetchone()[0]
patches = db.execute("SELECT count(*) FROM state_patches").fetchone()[0]
db.execute(
    "INSERT INTO spans (trace_id, span_id, service_name, start_time, end_time)"
    " VALUES ('ff', 'ff', 'duckdb-1.1', now(), now())"
)
print(json.dumps({"version": duckdb.__version__, "spans": spans, "patches": patches}))
"""


async def make_store(path: Path) -> None:
    """Every golden batch, through the store, into `path`."""
    engine = create_engine(f"sqlite+aiosqlite:///{path.with_suffix('.sqlite')}")
    await init_schema(engine)
    store = DuckDBStore(path, converter="thread")
    await store.open()
    try:
        for batch in batches():
            async with engine.begin() as conn:
                await store.write(batch, conn)
    finally:
        await store.close()
        await close_engine(engine, quiet=True)


def main() -> int:
    """Make the file, open it with DuckDB 1.1, report."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "otel_data.db"
        asyncio.run(make_store(path))
        done = subprocess.run(
            ["uv", "run", "--no-project", "--with", DUCKDB_1_1, "python", "-c", READER, str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    if done.returncode != 0:
        print(f"DuckDB 1.1 could not use the file: {done.stderr.strip().splitlines()[-1:]}")
        return 1
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"duckdb {figures['version']} opened the file: {figures['spans']} spans, "
        f"{figures['patches']} state patches, and inserted a row"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
