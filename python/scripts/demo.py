"""The whole loop on one machine: Go ingestion peer, backend, API key, OTLP spans, drain.

    python python/scripts/demo.py [--spans N] [--timeout S] [--check]
                                  [--peer {auto,container,binary}] [--peer-binary PATH]
                                  [--backend {subprocess,container}] [--backend-image TAG]

Starts the Go ingestion peer with a fresh WAL, and `junjo-backend serve` with a fresh
SQLite file, both on free loopback ports. The peer runs as a container when a Docker engine
answers `docker info` (`--peer auto`, the default): the image junjo-ingestion-peer:demo is
built from go-compat-tests/image with the static binary go-compat-tests/bin/ingestion-peer
(`make peer`) copied in, nothing pulled, and run on host networking. Without an engine it
runs that binary directly. The backend runs as a subprocess of this environment, or with
`--backend container` as the image junjo-backend:local (`make image`), also on host
networking, as its own non-root user, its SQLite file on a /data bind mount. The demo then
creates an API key with the CLI (inside the backend's container when there is one); sends
spans to the peer with the OpenTelemetry SDK's OTLP gRPC exporter and that key; waits until
the backend's /health says its poller has processed them all, and until every container's
own HEALTHCHECK says healthy; reads /metrics; prints a summary (saying how each side ran)
and stops everything it started (`docker stop`, then removal, for containers), also on
failure or Ctrl-C. `--check` (CI) fails unless every span sent was received, an unknown key
was refused, /metrics counted what happened (the spans processed, the peer's valid and
refused keys), every container was healthy, and the backend and the peer shut down cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import docker.errors  # type: ignore[import-untyped]  # docker-py ships no types
import httpx
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from prometheus_client.parser import text_string_to_metric_families

# Run as a file (`python python/scripts/demo.py`): the shared harness lives in python/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.peer import (
    IMAGE_CONTEXT,
    PEER_BINARY,
    REPO_ROOT,
    ChildProcess,
    HostContainer,
    Peer,
    PeerError,
    PeerImage,
    PeerPorts,
    build_image,
    shared_client,
    tail,
)
from harness.waiting import (
    NeverHappenedError,
    free_ports,
    wait_until_sync,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from opentelemetry.sdk.trace import ReadableSpan

PEER_IMAGE = "junjo-ingestion-peer:demo"
BACKEND_IMAGE = "junjo-backend:local"
# The image's volume; its DATABASE_URL points there.
DATA_MOUNT = "/data"
API_KEY = re.compile(r"\b[0-9A-Za-z]{64}\b")
# The images' HEALTHCHECKs probe every 10 s; the demo runs the same probes every second.
HEALTH_INTERVAL_SECONDS = 1.0


class DemoFailedError(Exception):
    """A step of the demo did not work; the message says which."""


class CountingExporter(SpanExporter):
    """Passes spans to the real OTLP exporter and counts those the peer accepted."""

    def __init__(self, exporter: OTLPSpanExporter) -> None:
        self._exporter = exporter
        self.accepted = 0
        self.refused = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export one batch and count its spans by outcome."""
        result = self._exporter.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.accepted += len(spans)
        else:
            self.refused += len(spans)
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the wrapped exporter."""
        return self._exporter.force_flush(timeout_millis)


@dataclass(frozen=True, slots=True)
class Ports:
    """Free loopback ports for everything the demo starts."""

    otlp: int
    internal: int
    auth: int
    http: int

    @property
    def peer(self) -> PeerPorts:
        """The peer's ports and the auth server's it dials."""
        return PeerPorts(public=self.otlp, internal=self.internal, backend=self.auth)


@dataclass(frozen=True, slots=True)
class Summary:
    """What the demo measured."""

    sent: int
    received: int
    entries_skipped: int
    backlog_age_seconds: float | None
    unknown_key_refused: bool
    peer: str
    backend: str
    # Each container's own HEALTHCHECK verdict once the spans were drained.
    container_health: Mapping[str, str]
    metrics: dict[str, float]


# What the demo starts: processes and containers, stopped in reverse order at the end.
Child = ChildProcess | HostContainer


def check_alive(child: Child) -> None:
    """Fail the demo if the process or container has ended."""
    if not child.running():
        code = child.stop()
        raise DemoFailedError(f"{child.name} exited early with status {code}")


def docker_engine_reachable() -> bool:
    """Whether the Docker engine answers."""
    try:
        return bool(shared_client().ping())
    except (docker.errors.DockerException, OSError):
        return False


def build_peer_image(peer_binary: Path) -> str:
    """Build the peer image from go-compat-tests/image plus the `make peer` binary; its tag."""
    try:
        return build_image(shared_client(), PEER_IMAGE, peer_binary).tag
    except PeerError as error:
        raise DemoFailedError(str(error)) from error


def until(condition: Callable[[], bool], deadline: float, failure: Callable[[], str]) -> None:
    """Poll `condition` until it holds; DemoFailedError with `failure()` past the deadline."""
    try:
        wait_until_sync(condition, limit=max(0.0, deadline - time.monotonic()), every=0.2)
    except NeverHappenedError:
        raise DemoFailedError(failure()) from None


def wait_for_http(backend: Child, url: str, deadline: float) -> None:
    """Until `url` answers (the backend's HTTP server is up)."""

    def answers() -> bool:
        check_alive(backend)
        try:
            return httpx.get(url, timeout=1.0).status_code == httpx.codes.OK
        except httpx.TransportError:
            return False

    until(answers, deadline, lambda: f"the backend did not answer {url} in time")


def wait_for_peer(peer: Peer, deadline: float) -> None:
    """Until the peer serves (and so our auth server has answered its readiness check)."""
    try:
        peer.wait_serving(timeout=max(1.0, deadline - time.monotonic()))
    except PeerError as error:
        first_line = str(error).splitlines()[0]
        raise DemoFailedError(f"the ingestion peer did not start serving: {first_line}") from None


def create_api_key(backend: Child, env: dict[str, str], workdir: Path) -> str:
    """A new key from `junjo-backend api-keys create`, read from its output.

    A backend container runs the command itself, as an operator would (`docker exec`).
    """
    if isinstance(backend, HostContainer):
        result = backend.exec("junjo-backend", "api-keys", "create", "demo")
    else:
        result = subprocess.run(
            [sys.executable, "-m", "junjo_backend.cli.main", "api-keys", "create", "demo"],
            env={**os.environ, **env},
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    match = API_KEY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise DemoFailedError(f"`api-keys create` failed ({result.returncode}): {result.stderr}")
    return match.group(0)


def exporter_for(otlp_port: int, key: str) -> CountingExporter:
    """The SDK's OTLP gRPC exporter pointed at the peer, sending `key` as the API key."""
    return CountingExporter(
        OTLPSpanExporter(
            endpoint=f"127.0.0.1:{otlp_port}",
            insecure=True,
            headers={"x-junjo-api-key": key},
            timeout=10,
        )
    )


def send_spans(otlp_port: int, key: str, count: int) -> int:
    """Send `count` spans through the SDK's batch processor; returns how many were accepted."""
    exporter = exporter_for(otlp_port, key)
    provider = TracerProvider(resource=Resource.create({"service.name": "junjo-demo"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("junjo-demo")
    for index in range(count):
        with tracer.start_as_current_span(f"demo-operation-{index % 7}") as span:
            span.set_attribute("demo.index", index)
    provider.force_flush()
    provider.shutdown()
    return exporter.accepted


def unknown_key_is_refused(otlp_port: int) -> bool:
    """Whether the peer refuses a span whose key the backend does not know."""
    exporter = exporter_for(otlp_port, "x" * 64)
    provider = TracerProvider(resource=Resource.create({"service.name": "junjo-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The exporter logs the expected UNAUTHENTICATED as an error; keep the output readable.
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
    previous = exporter_log.level
    exporter_log.setLevel(logging.CRITICAL)
    try:
        with provider.get_tracer("junjo-demo").start_as_current_span("refused"):
            pass
        provider.shutdown()
    finally:
        exporter_log.setLevel(previous)
    return exporter.refused == 1 and exporter.accepted == 0


def scraped_metrics(metrics_url: str) -> dict[str, float]:
    """The /metrics figures the demo checks: spans processed, auth calls by outcome."""
    wanted = {
        "junjo_poller_spans_processed_total": "spans processed",
        "junjo_auth_validate_calls_total": "auth calls",
    }
    figures: dict[str, float] = {}
    text = httpx.get(metrics_url, timeout=5.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                outcome = sample.labels.get("outcome")
                label = wanted[sample.name] + (f" {outcome}" if outcome else "")
                figures[label] = sample.value
    return figures


def wait_for_drain(
    backend: Child, health_url: str, sent: int, deadline: float
) -> dict[str, object]:
    """The first /health poller section that counts `sent` spans processed."""
    poller: dict[str, object] | None = None

    def drained() -> bool:
        nonlocal poller
        check_alive(backend)
        try:
            poller = httpx.get(health_url, timeout=5.0).json()["poller"]
        except httpx.TransportError:
            poller = None
        return isinstance(poller, dict) and int(str(poller["spans_processed"])) >= sent

    until(
        drained, deadline, lambda: f"the backend had not processed {sent} spans in time: {poller}"
    )
    assert poller is not None  # noqa: S101 (drained() held)
    return poller


def wait_for_health(containers: Sequence[HostContainer], deadline: float) -> dict[str, str]:
    """Each container's HEALTHCHECK verdict, once none is still starting (or at the deadline)."""
    verdicts: dict[str, str] = {}

    def settled() -> bool:
        verdicts.update((container.name, container.health()) for container in containers)
        for container in containers:
            check_alive(container)
        return "starting" not in verdicts.values()

    with contextlib.suppress(NeverHappenedError):
        wait_until_sync(settled, limit=max(0.0, deadline - time.monotonic()), every=0.2)
    return verdicts


def backend_image_present(image: str) -> bool:
    """Whether the backend image exists in the local engine."""
    try:
        shared_client().images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so that the clean-up below runs for both."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_backend(
    ports: Ports, workdir: Path, backend_image: str | None
) -> tuple[Child, dict[str, str]]:
    """The backend as a subprocess, or as a container of `backend_image`; its settings.

    The settings put every address on loopback. The container keeps the image's own
    DATABASE_URL (a SQLite file on its /data volume, here a folder of the demo's) and runs
    as the image's non-root user, hence a folder anyone may write.
    """
    env = {
        "AUTH_GRPC_LISTEN_ADDRESS": f"127.0.0.1:{ports.auth}",
        "INGESTION_GRPC_ADDRESS": f"127.0.0.1:{ports.internal}",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(ports.http),
        # The peer starts after the backend: keep the poller's first retries short.
        "POLLER_MAX_BACKOFF_SECONDS": "1",
    }
    if backend_image is None:
        env["DATABASE_URL"] = f"sqlite+aiosqlite:///{workdir / 'junjo.db'}"
        argv = [sys.executable, "-m", "junjo_backend.cli.main", "serve"]
        return ChildProcess("backend", argv, env, workdir / "backend.log", workdir), env
    data_dir = workdir / "data"
    data_dir.mkdir()
    data_dir.chmod(0o777)  # the image's user is not us; the demo's folder goes away after
    container = HostContainer(
        shared_client(),
        "backend",
        backend_image,
        env,
        {data_dir: DATA_MOUNT},
        health_interval=HEALTH_INTERVAL_SECONDS,
        container_name=f"junjo-demo-backend-{os.getpid()}",
    )
    return container, env


def run(
    peer_binary: Path,
    spans: int,
    timeout: float,
    workdir: Path,
    children: list[Child],
    *,
    in_container: bool,
    backend_image: str | None,
) -> Summary:
    """Start everything, send spans, wait for the drain; the caller stops the children."""
    if in_container:
        print(f"building the peer image {PEER_IMAGE} from {IMAGE_CONTEXT.relative_to(REPO_ROOT)}")
        image = build_peer_image(peer_binary)
        peer_label = f"container ({image})"
    else:
        peer_label = f"binary ({peer_binary})"
    backend_label = f"container ({backend_image})" if backend_image else "subprocess"
    ports = Ports(*free_ports(4))
    deadline = time.monotonic() + timeout
    backend, backend_env = start_backend(ports, workdir, backend_image)
    children.append(backend)  # before it starts: a half-started container is removed too
    backend.start()
    peer = Peer(
        ports.peer,
        workdir / "wal",
        image=PeerImage(image, built_here=True) if in_container else None,
        client=shared_client() if in_container else None,
        binary=peer_binary,
        health_interval=HEALTH_INTERVAL_SECONDS,
        container_name=f"junjo-demo-ingestion-peer-{os.getpid()}",
    )
    children.append(peer.runner)
    peer.start()
    base_url = f"http://127.0.0.1:{ports.http}"
    wait_for_http(backend, f"{base_url}/ping", deadline)
    wait_for_peer(peer, deadline)
    print(f"backend on {base_url} (auth gRPC 127.0.0.1:{ports.auth}); peer OTLP on :{ports.otlp}")

    refused = unknown_key_is_refused(ports.otlp)
    key = create_api_key(backend, backend_env, workdir)
    print(f"created an API key; sending {spans} spans over OTLP/gRPC")
    sent = send_spans(ports.otlp, key, spans)
    poller = wait_for_drain(backend, f"{base_url}/health", sent, deadline)
    containers = [child for child in children if isinstance(child, HostContainer)]
    health = wait_for_health(containers, deadline)
    backlog = poller.get("backlog_age_seconds")
    return Summary(
        sent=sent,
        received=int(str(poller["spans_processed"])),
        entries_skipped=int(str(poller["entries_skipped"])),
        backlog_age_seconds=float(backlog) if isinstance(backlog, int | float) else None,
        unknown_key_refused=refused,
        peer=peer_label,
        backend=backend_label,
        container_health=health,
        metrics=scraped_metrics(f"{base_url}/metrics"),
    )


def print_summary(summary: Summary, exits: Mapping[str, int | None]) -> None:
    """The figures, one per line."""
    backlog = (
        "n/a" if summary.backlog_age_seconds is None else f"{summary.backlog_age_seconds:.2f} s"
    )
    rows = [
        ("ingestion peer ran as", summary.peer),
        ("backend ran as", summary.backend),
        ("spans sent (accepted by the peer)", str(summary.sent)),
        ("spans received (backend poller)", str(summary.received)),
        ("WAL entries skipped (undecodable)", str(summary.entries_skipped)),
        ("backlog age once drained", backlog),
        ("unknown API key refused", "yes" if summary.unknown_key_refused else "NO"),
    ]
    rows += [(f"{name} HEALTHCHECK", verdict) for name, verdict in summary.container_health.items()]
    rows += [(f"/metrics: {label}", f"{count:g}") for label, count in summary.metrics.items()]
    rows += [(f"{name} exit status", str(code)) for name, code in exits.items()]
    print("summary:")
    for label, value in rows:
        print(f"  {label:<36} {value}")


def problems_with(summary: Summary, exits: Mapping[str, int | None]) -> list[str]:
    """What `--check` holds the run to."""
    problems = []
    if summary.sent == 0:
        problems.append("no span was accepted by the peer")
    if summary.received != summary.sent:
        problems.append(f"received {summary.received} spans, sent {summary.sent}")
    if summary.entries_skipped:
        problems.append(f"the ingestion-service skipped {summary.entries_skipped} WAL entries")
    if not summary.unknown_key_refused:
        problems.append("an unknown API key was not refused")
    problems += [
        f"the {name} container's HEALTHCHECK said {verdict}"
        for name, verdict in summary.container_health.items()
        if verdict != "healthy"
    ]
    counted = summary.metrics
    if counted.get("spans processed") != summary.received:
        problems.append(f"/metrics counted {counted.get('spans processed')} spans processed")
    # The peer's start-up probe and the unknown key are refused; the demo's key is valid.
    refused_at_least = 2
    if counted.get("auth calls invalid", 0) < refused_at_least or not counted.get(
        "auth calls valid"
    ):
        problems.append(f"/metrics did not count the peer's auth calls: {counted}")
    if exits.get("backend") != 0:
        problems.append(f"the backend exited with {exits.get('backend')} after SIGTERM")
    if exits.get("ingestion-peer") != 0:
        problems.append(f"the peer exited with {exits.get('ingestion-peer')} after SIGTERM")
    return problems


def peer_in_container(choice: str) -> bool:
    """Resolve `--peer` (auto: a container if `docker info` succeeds) and say which it is."""
    engine = choice != "binary" and docker_engine_reachable()
    if choice == "container" and not engine:
        raise DemoFailedError("--peer container: no Docker engine answered `docker info`")
    if choice == "auto":
        reason = "a Docker engine answered" if engine else "no Docker engine answered"
        print(f"ingestion peer: {'container' if engine else 'binary'} ({reason} `docker info`)")
    else:
        print(f"ingestion peer: {choice} (--peer {choice})")
    return engine


def backend_image_for(choice: str, image: str) -> str | None:
    """Resolve `--backend`: the image to run, or None for a subprocess; say which it is."""
    if choice == "subprocess":
        print("backend: subprocess (--backend subprocess)")
        return None
    if not docker_engine_reachable():
        raise DemoFailedError("--backend container: no Docker engine answered `docker info`")
    if not backend_image_present(image):
        raise DemoFailedError(f"--backend container: no image {image}; build it with `make image`")
    print(f"backend: container {image} (--backend container)")
    return image


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=300, help="how many spans to send")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds for start-up, sending and draining"
    )
    parser.add_argument("--check", action="store_true", help="fail unless received == sent")
    parser.add_argument(
        "--peer",
        choices=("auto", "container", "binary"),
        default="auto",
        help="how to run the ingestion peer (auto: a container if `docker info` succeeds)",
    )
    parser.add_argument(
        "--backend",
        choices=("subprocess", "container"),
        default="subprocess",
        help="how to run the backend (container: the image --backend-image, from `make image`)",
    )
    parser.add_argument(
        "--backend-image",
        default=BACKEND_IMAGE,
        help="the backend image --backend container runs",
    )
    parser.add_argument(
        "--peer-binary",
        type=Path,
        default=PEER_BINARY,
        help="the static ingestion peer binary, run directly or copied into the image",
    )
    args = parser.parse_args(argv)
    if not args.peer_binary.exists():
        print(f"{args.peer_binary} is missing: build it with `make peer`", file=sys.stderr)
        return 1
    try:
        in_container = peer_in_container(args.peer)
        backend_image = backend_image_for(args.backend, args.backend_image)
    except DemoFailedError as exc:
        print(exc, file=sys.stderr)
        return 1

    children: list[Child] = []
    summary: Summary | None = None
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="junjo-demo-") as tmp, sigterm_as_interrupt():
        workdir = Path(tmp)
        try:
            summary = run(
                args.peer_binary,
                args.spans,
                args.timeout,
                workdir,
                children,
                in_container=in_container,
                backend_image=backend_image,
            )
        except (DemoFailedError, OSError, subprocess.SubprocessError) as exc:
            failure = str(exc)
        except KeyboardInterrupt:
            failure = "interrupted"
        finally:
            exits = {child.name: child.stop() for child in reversed(children)}
            if failure is not None and failure != "interrupted":
                for child in children:
                    print(f"--- last lines of {child.name}'s output ---\n{tail(child.logs())}")

    if summary is None:
        print(f"demo failed: {failure}", file=sys.stderr)
        return 130 if failure == "interrupted" else 1
    print_summary(summary, exits)
    problems = problems_with(summary, exits)
    if problems:
        print(("check failed: " if args.check else "note: ") + "; ".join(problems), file=sys.stderr)
        return 1 if args.check else 0
    if args.check:
        print("check passed: every span sent was received")
    return 0


if __name__ == "__main__":
    sys.exit(main())
