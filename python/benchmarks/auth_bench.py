"""ValidateApiKey benchmark: our AuthServer against a bare grpc.aio server, same run.

Both servers run in this process, one measured at a time; the Go load generator
`authload` (go-compat-tests/cmd/authload, grpc-go like the ingestion-service) drives them
over loopback. The anchor is a bare `grpc.aio` server answering from a Python set; ours
answers from the real SQLite database (through its key snapshot), with its logging
interceptor, health service and all. Rounds alternate the two servers so that noise from
other work on the machine falls on both.

Scenarios: concurrency 1, 16, 64 with valid keys only; and an invalid-key flood at
concurrency 16 (90% fresh random keys, never repeated) whose valid-key p99 is compared
with the valid-only run. Then, on our server only: how long a revoked key keeps
validating, and how long a new key takes to validate.

Bounded: a few seconds per point, stops by itself. Figures are printed next to the bars
of docs/performance.md#auth and written to bench-results/auth.json at the repository root.

    uv run --no-sync python benchmarks/auth_bench.py [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from junjo_backend._wire.ingestion import auth_pb2, auth_pb2_grpc
from junjo_backend.auth.key_store import create_api_key, revoke_api_key
from junjo_backend.auth.server import AuthServer
from junjo_backend.database import close_engine, create_engine, init_schema
from junjo_backend.settings import Settings

# Run as a file (`python python/benchmarks/auth_bench.py`): the shared harness is in python/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.go_tools import go_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench-results" / "auth.json"

CONCURRENCIES = (1, 16, 64)
FLOOD_CONCURRENCY = 16
FLOOD_INVALID_RATIO = 0.9
KEY_COUNT = 20

# The bars (docs/performance.md#auth).
BAR_RPS_RATIO_AT_16 = 0.9
BAR_P99_MS_AT_16 = 20.0
BAR_FLOOD_P99_RATIO = 2.0
BAR_REVOCATION_S = 1.0


class BareAuthServicer(auth_pb2_grpc.InternalAuthServiceServicer):
    """The anchor: the least a Python grpc.aio server can do, a set lookup."""

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys

    async def ValidateApiKey(
        self,
        request: auth_pb2.ValidateApiKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],  # noqa: ARG002 (the generated signature)
    ) -> auth_pb2.ValidateApiKeyResponse:
        """Whether the key is in the set."""
        return auth_pb2.ValidateApiKeyResponse(is_valid=request.api_key in self._keys)


@dataclass
class Point:
    """One scenario on one server, over all rounds."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, pick: str, cls: str | None = None) -> float:
        """The median over rounds of a figure from authload's report."""
        values = [float((r["classes"][cls] if cls else r)[pick]) for r in self.runs]
        return statistics.median(values)

    def total(self, pick: str) -> int:
        """A count summed over rounds."""
        return sum(int(r[pick]) for r in self.runs)


async def authload(address: str, keys_file: Path, seconds: float, **flags: float) -> dict[str, Any]:
    """One authload run; its JSON report."""
    args = [
        str(go_tool("authload")),
        f"-addr={address}",
        f"-keys={keys_file}",
        f"-duration={seconds}s",
        *(f"-{name.replace('_', '-')}={value}" for name, value in flags.items()),
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"authload failed: {err.decode().strip()}")
    report: dict[str, Any] = json.loads(out)
    return report


async def start_bare(keys: set[str]) -> tuple[grpc.aio.Server, str]:
    """The anchor server on an ephemeral loopback port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    auth_pb2_grpc.add_InternalAuthServiceServicer_to_server(BareAuthServicer(keys), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def time_until(address: str, key: str, *, want: bool, limit: float) -> float:
    """Seconds until ValidateApiKey(key) answers `want`, polling every millisecond."""
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = auth_pb2_grpc.InternalAuthServiceStub(channel)
        request = auth_pb2.ValidateApiKeyRequest(api_key=key)
        while time.perf_counter() - started < limit:
            if (await stub.ValidateApiKey(request, timeout=5)).is_valid == want:
                return time.perf_counter() - started
            await asyncio.sleep(0.001)
    return float("inf")


async def measure_freshness(server: AuthServer, settings: Settings) -> dict[str, float]:
    """How long a revoked key keeps validating, and a new key takes to validate."""
    engine = create_engine(settings.database_url)  # a second connection, like the CLI's
    try:
        revoked, created = [], []
        for _ in range(5):
            key = await create_api_key(engine, "bench-revoke")
            await time_until(server.address, key.key, want=True, limit=5)
            await revoke_api_key(engine, key.id)
            revoked.append(await time_until(server.address, key.key, want=False, limit=5))
            fresh = await create_api_key(engine, "bench-create")
            created.append(await time_until(server.address, fresh.key, want=True, limit=5))
            await revoke_api_key(engine, fresh.id)
    finally:
        await close_engine(engine)
    return {
        "revocation_max_s": round(max(revoked), 4),
        "revocation_median_s": round(statistics.median(revoked), 4),
        "new_key_max_s": round(max(created), 4),
        "new_key_median_s": round(statistics.median(created), 4),
    }


async def run(seconds: float, rounds: int) -> dict[str, Any]:
    """Every scenario on both servers; the results document."""
    workdir = Path(tempfile.mkdtemp(prefix="auth-bench-"))
    try:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{workdir / 'junjo.db'}",
            auth_grpc_listen_address="127.0.0.1:0",
            _env_file=None,
        )
        engine = create_engine(settings.database_url)
        await init_schema(engine)
        keys = {(await create_api_key(engine, f"bench-{i}")).key for i in range(KEY_COUNT)}
        keys_file = workdir / "keys.txt"
        keys_file.write_text("\n".join(sorted(keys)) + "\n")

        bare, bare_address = await start_bare(keys)
        ours = AuthServer(settings, engine)
        await ours.start()
        servers = {"bare": bare_address, "ours": ours.address}
        scenarios: dict[str, dict[str, float]] = {
            **{f"c{c}": {"concurrency": c} for c in CONCURRENCIES},
            "flood": {"concurrency": FLOOD_CONCURRENCY, "invalid_ratio": FLOOD_INVALID_RATIO},
        }
        points: dict[str, dict[str, Point]] = {s: {n: Point() for n in servers} for s in scenarios}
        flood_reads: list[float] = []
        try:
            for round_no in range(rounds):
                order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
                for scenario, flags in scenarios.items():
                    for name in order:
                        reads_before, t0 = ours.known_keys.reads, time.perf_counter()
                        cpu0 = time.process_time()
                        report = await authload(servers[name], keys_file, seconds, **flags)
                        # This process runs only the server under load meanwhile, so its
                        # CPU time per call is the server's cost, and far less sensitive
                        # to other work on the machine than requests/s.
                        calls = report["calls"] + report["warmup_calls"]
                        report["server_cpu_us_per_call"] = round(
                            (time.process_time() - cpu0) / calls * 1e6, 1
                        )
                        if name == "ours" and scenario == "flood":
                            elapsed = time.perf_counter() - t0
                            flood_reads.append((ours.known_keys.reads - reads_before) / elapsed)
                        points[scenario][name].runs.append(report)
                        print(
                            f"  round {round_no + 1} {scenario:>5} {name:>4}: "
                            f"{report['rps']:7.0f} rps  p99 {report['p99_ms']:6.2f} ms  "
                            f"cpu {report['server_cpu_us_per_call']:5.0f} us/call  "
                            f"errors {report['errors']}  wrong {report['wrong_answers']}",
                            flush=True,
                        )
            freshness = await measure_freshness(ours, settings)
        finally:
            await ours.stop(0)
            await bare.stop(0)
            await close_engine(engine)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return summarize(points, flood_reads, freshness, seconds, rounds)


def summarize(
    points: dict[str, dict[str, Point]],
    flood_reads: list[float],
    freshness: dict[str, float],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """The results document: medians per point, ratios, and the bars."""
    table: dict[str, Any] = {}
    for scenario, by_server in points.items():
        table[scenario] = {
            name: {
                "rps": round(p.median("rps"), 1),
                "p50_ms": p.median("p50_ms"),
                "p99_ms": p.median("p99_ms"),
                "valid_p99_ms": p.median("p99_ms", "valid"),
                "server_cpu_us_per_call": p.median("server_cpu_us_per_call"),
                "errors": p.total("errors"),
                "wrong_answers": p.total("wrong_answers"),
                "runs": p.runs,
            }
            for name, p in by_server.items()
        }
    c16, flood = table["c16"], table["flood"]
    rps_ratio = c16["ours"]["rps"] / c16["bare"]["rps"]
    flood_ratio = flood["ours"]["valid_p99_ms"] / c16["ours"]["valid_p99_ms"]
    bare_flood_ratio = flood["bare"]["valid_p99_ms"] / c16["bare"]["valid_p99_ms"]
    wrong = sum(t[n]["wrong_answers"] + t[n]["errors"] for t in table.values() for n in t)
    bars = {
        "rps_ratio_at_16": {"value": round(rps_ratio, 3), "bar": f">= {BAR_RPS_RATIO_AT_16}"},
        "p99_ms_at_16": {"value": c16["ours"]["p99_ms"], "bar": f"<= {BAR_P99_MS_AT_16}"},
        "flood_valid_p99_ratio": {
            "value": round(flood_ratio, 3),
            "bar": f"<= {BAR_FLOOD_P99_RATIO}",
            "anchor": round(bare_flood_ratio, 3),
        },
        "wrong_answers_and_errors": {"value": wrong, "bar": "== 0"},
        "revocation_max_s": {"value": freshness["revocation_max_s"], "bar": "<= 1.0"},
    }
    bars["rps_ratio_at_16"]["met"] = rps_ratio >= BAR_RPS_RATIO_AT_16
    bars["p99_ms_at_16"]["met"] = c16["ours"]["p99_ms"] <= BAR_P99_MS_AT_16
    bars["flood_valid_p99_ratio"]["met"] = flood_ratio <= BAR_FLOOD_P99_RATIO
    bars["wrong_answers_and_errors"]["met"] = wrong == 0
    bars["revocation_max_s"]["met"] = freshness["revocation_max_s"] <= BAR_REVOCATION_S
    return {
        "benchmark": "auth",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds_per_point": seconds,
        "rounds": rounds,
        "flood": {
            "concurrency": FLOOD_CONCURRENCY,
            "invalid_ratio": FLOOD_INVALID_RATIO,
            "database_reads_per_s": round(statistics.median(flood_reads), 1),
        },
        "points": table,
        # Requests/s swing with whatever else the machine runs; CPU per call much less.
        # When the server is CPU-bound, the rps ratio is about the inverse of this one.
        "cpu_per_call_ratio_at_16": round(
            c16["ours"]["server_cpu_us_per_call"] / c16["bare"]["server_cpu_us_per_call"], 3
        ),
        "freshness": freshness,
        "bars": bars,
    }


def print_report(doc: dict[str, Any]) -> None:
    """The figures side by side with the anchor, then the bars."""
    print()
    print(f"ValidateApiKey, medians of {doc['rounds']} rounds x {doc['seconds_per_point']} s")
    print(
        f"{'scenario':<10}{'bare rps':>10}{'ours rps':>10}{'ratio':>7}{'bare p99':>10}"
        f"{'ours p99':>10}{'valid p99 bare/ours':>22}{'cpu us/call bare/ours':>24}"
    )
    for scenario, row in doc["points"].items():
        bare, ours = row["bare"], row["ours"]
        print(
            f"{scenario:<10}{bare['rps']:>10.0f}{ours['rps']:>10.0f}"
            f"{ours['rps'] / bare['rps']:>7.2f}{bare['p99_ms']:>8.2f}ms{ours['p99_ms']:>8.2f}ms"
            f"{bare['valid_p99_ms']:>11.2f} / {ours['valid_p99_ms']:<6.2f}ms"
            f"{bare['server_cpu_us_per_call']:>13.0f} / {ours['server_cpu_us_per_call']:<6.0f}"
        )
    fresh = doc["freshness"]
    print(
        f"flood: {doc['flood']['database_reads_per_s']} database reads/s; "
        f"revoked key refused after {fresh['revocation_max_s'] * 1000:.0f} ms (max), "
        f"new key valid after {fresh['new_key_max_s'] * 1000:.0f} ms (max)"
    )
    print(f"server CPU per call at 16, ours/bare: {doc['cpu_per_call_ratio_at_16']}")
    print("\nbars (docs/performance.md#auth)")
    print(f"{'bar':<28}{'value':>10}  {'bar':<8}{'met':>5}")
    for name, bar in doc["bars"].items():
        anchor = f"  (bare: {bar['anchor']})" if "anchor" in bar else ""
        print(f"{name:<28}{bar['value']!s:>10}  {bar['bar']:<8}{bar['met']!s:>5}{anchor}")


def main() -> int:
    """Run the benchmark, print it, write bench-results/auth.json; 1 if any answer was wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (servers alternate)")
    args = parser.parse_args()
    go_tool("authload")  # built now, if `make peer` has not, rather than mid-measurement
    doc = asyncio.run(run(args.seconds, args.rounds))
    print_report(doc)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")
    # Speed is reported, not enforced (the machine decides it); a wrong answer is a bug.
    return 0 if doc["bars"]["wrong_answers_and_errors"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
