"""Deadline flood: ValidateApiKey calls that die at once, on the legitimate calls' connection.

The Go ingestion-service sends every cache miss over one HTTP/2 connection, under the OTLP
caller's context, so callers with random keys and tiny deadlines (or that hang up) put
calls that die within a millisecond on the connection the valid keys use. authload (grpc-go)
does the same: legitimate workers with 5 s deadlines, and flood workers whose calls get
1 ms deadlines, or are cancelled by the client at a random moment within 2 ms.

What happens (measured in this scenario, explained in auth_service.py): a dead call still
sits in grpc core's queue of calls the application has not picked up yet, and the Python
server picks each one up in turn. A flood faster than the server's call rate grows that
queue, and past `grpc.server.max_pending_requests` core sheds *new* calls with CANCELLED,
legitimate ones included (random early drop up to the hard limit). So legitimate calls can
fail only while the flood outruns the server, only with CANCELLED, never with a wrong
answer, and they stop failing once the flood stops and its backlog has drained. Those are
the assertions; the failure rate is the row's figure.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from junjo_backend.auth.key_store import generate_api_key

from .net_helpers import authload, running_backend

if TYPE_CHECKING:
    from .conftest import FaultKit

# The legitimate callers and the flood, as in the measurements.
LEGITIMATE_WORKERS = 4
FLOOD_SECONDS = 4
DRAIN_SECONDS = 2.0
SHED = "Canceled"  # grpc-go's name for CANCELLED: core's backlog shedding


def _legit(report: dict[str, object]) -> dict[str, object]:
    classes = report["classes"]
    assert isinstance(classes, dict)
    valid = classes.get("valid", {})
    assert isinstance(valid, dict)
    return valid


def test_deadline_flood_spills_only_as_shed_calls(
    kit: FaultKit,
) -> None:
    """Legitimate calls during the flood: counted; any failure is CANCELLED; none after it."""
    keys = asyncio.run(kit.store_keys(kit.sqlite_url(), 4))
    invalid = [generate_api_key() for _ in range(64)]
    for key in invalid:
        kit.keys.add(key)
    keys_file = kit.folder / "keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    invalid_file = kit.folder / "invalid.txt"
    invalid_file.write_text("\n".join(invalid) + "\n")
    load_errors = kit.output.path("authload-flood")

    floods = {
        "2 workers, 1 ms deadlines": {"flood": 2, "flood_timeout": "1ms"},
        "16 workers, 1 ms deadlines": {"flood": 16, "flood_timeout": "1ms"},
        "16 workers, cancelled within 2 ms": {
            "flood": 16,
            "flood_timeout": "2ms",
            "flood_cancel": "true",
        },
    }
    with running_backend(kit, "serve-flood") as backend:
        reports = {
            name: authload(
                backend.auth_address,
                keys_file,
                load_errors,
                FLOOD_SECONDS,
                concurrency=LEGITIMATE_WORKERS,
                invalid_keys=invalid_file,
                **flags,
            )
            for name, flags in floods.items()
        }
        # The dead calls already queued drain at the server's call rate (at most the hard
        # limit of them, about a second here) before "after the flood" begins.
        time.sleep(DRAIN_SECONDS)
        after = authload(
            backend.auth_address, keys_file, load_errors, 1, concurrency=LEGITIMATE_WORKERS
        )
        assert backend.alive()

    parts = []
    for name, report in reports.items():
        legit = _legit(report)
        codes = legit.get("error_codes") or {}
        assert isinstance(codes, dict)
        flood_calls = report["classes"]["invalid"]["calls"]
        parts.append(
            f"{name}: {legit['errors']} of {legit['calls']} failed, p99 {legit['p99_ms']} ms"
            f" ({flood_calls / report['seconds']:,.0f} flood calls/s)"
        )
        assert report["wrong_answers"] == 0, report
        assert set(codes) <= {SHED}, f"{name}: legitimate calls failed otherwise: {codes}"
    after_legit = _legit(after)
    assert after["wrong_answers"] == 0, after
    assert after_legit["errors"] == 0, f"still failing after the flood: {after}"

    kit.table.add(
        "deadline flood on the legitimate calls' connection (grpc-go, 5 s legitimate deadlines)",
        f"{sum(r['classes']['invalid']['calls'] for r in reports.values()):,} flood calls",
        "; ".join(parts)
        + f"; every failure CANCELLED (core sheds past its pending-call backlog), 0 wrong"
        f" answers; after the flood 0 of {after_legit['calls']} failed",
    )
