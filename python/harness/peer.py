"""The Go ingestion peer as the contract and fault suites, the demo and the benchmarks run it.

One place builds or finds the peer (the static binary of go-compat-tests, or an image of it),
runs it with its settings as a container on host networking or as a child process, waits
until it serves, stops it and keeps its logs. The image the suites run is built from the Go
sources and tagged with a hash of them, so a second session with unchanged sources reuses it.
`JUNJO_COMPAT_INGESTION_IMAGE` names another image to run instead, such as the published
`mdrideout/junjo-server-ingestion-service:0.61.1`: that image listens on the fixed ports 50051 and
50052 and dials the fixed host `junjo-server-backend:50053`, so its containers get an
/etc/hosts entry pointing that name at 127.0.0.1 and our auth server must listen on 50053.

Everything here is synchronous (docker-py and the process calls block); async callers run
the calls in a thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import docker.errors  # type: ignore[import-untyped]  # docker-py ships no types
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from harness.go_tools import GO_BIN, GO_MODULE, GoBuildError, go_build
from harness.waiting import NeverHappenedError, free_ports, port_is_free, wait_until_sync

if TYPE_CHECKING:
    from collections.abc import Mapping

REPO_ROOT = GO_MODULE.parent
IMAGE_CONTEXT = GO_MODULE / "image"
PEER_BINARY = GO_BIN / "ingestion-peer"
IMAGE_ENV = "JUNJO_COMPAT_INGESTION_IMAGE"
IMAGE_REPOSITORY = "junjo-compat/ingestion-peer"
SOURCE_HASH_LABEL = "org.junjo-backend.compat.source-hash"
SESSION_LABEL = "org.junjo-backend.compat.session"
# Upstream's docker-publish.yml pushes the ingestion-service as this repository, tagged with
# each release version, major.minor, `latest` and the short commit SHA. The release pinned
# here (compose.yaml, hosted CI) has protos that differ from go-contract/ in comments only.
PUBLISHED_IMAGE_REPOSITORY = "mdrideout/junjo-server-ingestion-service"
PUBLISHED_RELEASE = "0.61.1"
PUBLISHED_IMAGE = f"{PUBLISHED_IMAGE_REPOSITORY}:{PUBLISHED_RELEASE}"
# What the published image dials; the containers of such an image resolve it to loopback.
PUBLISHED_BACKEND_HOST = "junjo-server-backend"
PUBLISHED_PORTS = (50051, 50052, 50053)
WAL_MOUNT = "/wal"
# Every container this process starts carries this label, so a session can sweep them.
SESSION_ID = uuid.uuid4().hex
STOP_TIMEOUT_SECONDS = 10
PROCESS_STOP_SECONDS = 30.0


class PeerError(Exception):
    """The peer (or a container) did not do what its user needs; the message carries its logs."""


@dataclass(frozen=True, slots=True)
class PeerImage:
    """An image to run, and whether it is ours (ports and backend address are settings)."""

    tag: str
    built_here: bool


@dataclass(frozen=True, slots=True)
class PeerPorts:
    """Loopback ports: the peer's public (OTLP) and internal (ReadSpans) ones, our auth server's."""

    public: int
    internal: int
    backend: int

    @classmethod
    def pick(cls, image: PeerImage | None = None) -> PeerPorts:
        """Free ports for our peer, else the published image's fixed ones (PeerError if taken)."""
        if image is not None and not image.built_here:
            ensure_ports_free(PUBLISHED_PORTS, image.tag)
            return cls(*PUBLISHED_PORTS)
        return cls(*free_ports(3))


def ensure_ports_free(ports: tuple[int, ...], image: str) -> None:
    """PeerError naming each of `ports` that something already listens on (127.0.0.1)."""
    taken = [str(port) for port in ports if not port_is_free(port)]
    if taken:
        raise PeerError(
            f"loopback port(s) {', '.join(taken)} already in use. {image} is not our peer "
            f"image, so it runs on the published image's fixed ports ({PUBLISHED_PORTS[0]} "
            f"public, {PUBLISHED_PORTS[1]} internal) and dials our auth server on "
            f"{PUBLISHED_PORTS[2]}: stop what holds them (another run of the suite?) and retry."
        )


@functools.cache
def shared_client() -> docker.DockerClient:
    """One Docker client for this process's peers, made on first use (DOCKER_HOST or the socket)."""
    return docker.from_env()


def source_files() -> list[Path]:
    """What goes into the peer binary and its image (tests and other commands do not)."""
    files = [GO_MODULE / "go.mod", GO_MODULE / "go.sum", IMAGE_CONTEXT / "Dockerfile"]
    for folder in (GO_MODULE / "cmd" / "ingestion-peer", GO_MODULE / "internal"):
        files.extend(p for p in folder.rglob("*.go") if not p.name.endswith("_test.go"))
    return sorted(files)


def source_hash() -> str:
    """A short hash of the peer's sources: the image tag."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(GO_MODULE).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def ensure_image(client: docker.DockerClient) -> PeerImage:
    """The image to run: `JUNJO_COMPAT_INGESTION_IMAGE`, or ours, built unless already present."""
    override = os.environ.get(IMAGE_ENV, "").strip()
    if override:
        try:
            client.images.get(override)
        except docker.errors.ImageNotFound:
            client.images.pull(override)
        return PeerImage(override, built_here=False)
    source = source_hash()
    tag = f"{IMAGE_REPOSITORY}:{source}"
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        with tempfile.TemporaryDirectory(prefix="ingestion-peer-build-") as folder:
            try:
                binary = go_build("ingestion-peer", Path(folder) / "ingestion-peer")
            except GoBuildError as error:
                raise PeerError(str(error)) from error
            build_image(client, tag, binary, labels={SOURCE_HASH_LABEL: source})
        _remove_stale_images(client, keep=tag)
    return PeerImage(tag, built_here=True)


def build_image(
    client: docker.DockerClient, tag: str, binary: Path, labels: Mapping[str, str] | None = None
) -> PeerImage:
    """Build the peer image `tag` from go-compat-tests/image with `binary` copied in.

    The Dockerfile is `FROM scratch`, so nothing is pulled.
    """
    with tempfile.TemporaryDirectory(prefix="ingestion-peer-image-") as context:
        for name in ("Dockerfile", ".dockerignore"):
            shutil.copy(IMAGE_CONTEXT / name, Path(context) / name)
        shutil.copy(binary, Path(context) / "ingestion-peer")
        try:
            client.images.build(path=context, tag=tag, labels=dict(labels or {}), rm=True)
        except (docker.errors.BuildError, docker.errors.APIError) as error:
            raise PeerError(f"docker build of the peer image {tag} failed: {error}") from error
    return PeerImage(tag, built_here=True)


def _remove_stale_images(client: docker.DockerClient, keep: str) -> None:
    """Drop peer images built from older sources; one in use is left alone."""
    for image in client.images.list(name=IMAGE_REPOSITORY):
        if keep not in image.tags:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image.id, noprune=False)


def remove_session_containers(client: docker.DockerClient) -> None:
    """Remove every container this session started that is somehow still there."""
    for container in client.containers.list(
        all=True, filters={"label": f"{SESSION_LABEL}={SESSION_ID}"}
    ):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


class HostContainer:
    """Runs of one image on host networking, driven with docker-py.

    `start` and `stop` may alternate (a restart keeps the mounts); `logs` covers every run.
    Run without auto-removal so that the exit code can be read after a graceful stop; `stop`
    removes the container in every case. `health_interval` makes the image's own
    HEALTHCHECK probe that often, so that a caller can wait for its verdict.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        name: str,
        image: str,
        env: Mapping[str, str],
        mounts: Mapping[Path, str],
        *,
        user: str | None = None,
        extra_hosts: Mapping[str, str] | None = None,
        health_interval: float | None = None,
        container_name: str | None = None,
    ) -> None:
        self.name = name
        self.image = image
        self.exit_code: int | None = None
        self._client = client
        self._container_name = container_name
        self.options: dict[str, object] = {
            "environment": dict(env),
            "volumes": {str(src): {"bind": target, "mode": "rw"} for src, target in mounts.items()},
            "network_mode": "host",
            "labels": {SESSION_LABEL: SESSION_ID},
        }
        if user is not None:
            self.options["user"] = user
        if extra_hosts:
            self.options["extra_hosts"] = dict(extra_hosts)
        if health_interval is not None:
            # An empty test keeps the image's own probe; only its timing changes.
            self.options["healthcheck"] = {
                "test": [],
                "interval": int(health_interval * 1e9),
                "start_period": 0,
            }
        self._container: docker.models.containers.Container | None = None
        self._past_logs: list[str] = []
        self._runs = 0

    def start(self) -> None:
        """`docker run -d`; PeerError if the container did not start."""
        if self._container is not None:
            raise RuntimeError(f"{self.name} is already running")
        self._runs += 1
        try:
            # Created, then started: one that fails to start is still ours to remove at `stop`.
            self._container = self._client.containers.create(
                self.image, name=self._container_name, **self.options
            )
            self._container.start()
        except docker.errors.APIError as error:
            raise PeerError(f"`docker run` of the {self.name} failed: {error}") from error

    def running(self) -> bool:
        """Whether the current run's process is alive."""
        container = self._container
        if container is None:
            return False
        try:
            container.reload()
        except docker.errors.NotFound:
            return False
        return bool(container.status == "running")

    def health(self) -> str:
        """The image's HEALTHCHECK verdict: starting, healthy, unhealthy (or none, unknown)."""
        container = self._container
        if container is None:
            return "unknown"
        try:
            container.reload()
        except docker.errors.NotFound:
            return "unknown"
        health = container.attrs.get("State", {}).get("Health")
        return str(health["Status"]) if health else "none"

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A command inside the running container (`docker exec`), its output captured."""
        if self._container is None:
            raise RuntimeError(f"{self.name} is not running")
        result = self._container.exec_run(list(argv), demux=True)
        stdout, stderr = (part.decode(errors="replace") if part else "" for part in result.output)
        return subprocess.CompletedProcess(list(argv), int(result.exit_code), stdout, stderr)

    def stop(self) -> int | None:
        """SIGTERM, wait for the exit (SIGKILL after 10 s), keep the logs, remove; the exit code."""
        container = self._container
        if container is None:
            return self.exit_code
        self._container = None
        self.exit_code = None
        try:
            container.stop(timeout=STOP_TIMEOUT_SECONDS)
            self.exit_code = int(container.wait(timeout=STOP_TIMEOUT_SECONDS)["StatusCode"])
        except (docker.errors.DockerException, OSError) as error:
            # The exit code stays unknown (None), which callers that check it report.
            self._past_logs.append(f"--- {self.name}: no clean stop: {error}")
        finally:
            self._past_logs.append(self._run_logs(container))
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        return self.exit_code

    def logs(self) -> str:
        """Stdout and stderr of every run so far, the current one last."""
        parts = list(self._past_logs)
        if self._container is not None:
            parts.append(self._run_logs(self._container))
        return "\n".join(parts)

    def _run_logs(self, container: docker.models.containers.Container) -> str:
        try:
            text = container.logs(stdout=True, stderr=True).decode(errors="replace")
        except docker.errors.APIError as error:
            return f"--- {self.name} run {self._runs}: logs unavailable: {error}"
        return f"--- {self.name} run {self._runs} ({self.image}) ---\n{text}"


class ChildProcess:
    """A process in its own session, its output (stdout and stderr) in a log file.

    Its own session, so that Ctrl-C reaches only its parent, which stops it with one
    SIGTERM (a second signal would force some servers).
    """

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.exit_code: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the process (its log appended to, so a restart keeps the earlier runs)."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running")
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if it has to; the exit status."""
        process = self._process
        if process is None:
            return self.exit_code
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=PROCESS_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
        self.exit_code = process.returncode
        return self.exit_code

    def logs(self) -> str:
        """What the process wrote, every run."""
        if not self.log_path.exists():
            return "(no output: the process did not run)"
        return self.log_path.read_text(errors="replace")


def tail(text: str, lines: int = 40) -> str:
    """The last `lines` lines of `text`."""
    return "\n".join(text.splitlines()[-lines:])


class Peer:
    """The Go ingestion peer on `ports` with its WAL in `wal_dir`: a container or the binary.

    With `image`, a container of it on host networking, run as the calling user so that the
    WAL files belong to them (needs `client`); otherwise `binary` as a child process, its log
    in `wal_dir`'s parent. `log_level` is our peer's (debug: what a failed test's report
    wants; a benchmark asks for less). `start` and `stop` may alternate; the WAL is kept.
    """

    def __init__(
        self,
        ports: PeerPorts,
        wal_dir: Path,
        name: str = "ingestion-peer",
        *,
        image: PeerImage | None = None,
        client: docker.DockerClient | None = None,
        binary: Path = PEER_BINARY,
        health_interval: float | None = None,
        container_name: str | None = None,
        log_level: str = "debug",
    ) -> None:
        self.ports = ports
        self.wal_dir = wal_dir
        self.name = name
        self.image = image
        self.runner: HostContainer | ChildProcess
        # Made here, so that it belongs to us and not to the Docker daemon.
        wal_dir.mkdir(parents=True, exist_ok=True)
        env = {"GRPC_PORT": str(ports.public), "INTERNAL_GRPC_PORT": str(ports.internal)}
        if image is None or image.built_here:
            env |= {
                "BACKEND_GRPC_ADDRESS": f"127.0.0.1:{ports.backend}",
                "LISTEN_HOST": "127.0.0.1",
                "LOG_LEVEL": log_level,
            }
        if image is None:
            env["BADGERDB_PATH"] = str(wal_dir)
            log = wal_dir.parent / f"{name}.log"
            self.runner = ChildProcess(name, [str(binary)], env, log, cwd=wal_dir.parent)
            return
        self.runner = HostContainer(
            client or shared_client(),
            name,
            image.tag,
            {**env, "BADGERDB_PATH": WAL_MOUNT},
            {wal_dir: WAL_MOUNT},
            user=f"{os.getuid()}:{os.getgid()}",
            # Another image dials the fixed host name of the deployed service.
            extra_hosts=None if image.built_here else {PUBLISHED_BACKEND_HOST: "127.0.0.1"},
            health_interval=health_interval,
            container_name=container_name,
        )

    @property
    def public_address(self) -> str:
        """Where OTLP exporters send spans."""
        return f"127.0.0.1:{self.ports.public}"

    @property
    def internal_address(self) -> str:
        """Where the backend reads spans (ReadSpans) and probes health."""
        return f"127.0.0.1:{self.ports.internal}"

    def start(self) -> None:
        """Start a run; it serves once our auth server has answered its readiness check."""
        self.runner.start()

    def stop(self) -> int | None:
        """Stop gracefully (the WAL is synced and closed); the exit code."""
        return self.runner.stop()

    def restart(self) -> int | None:
        """Stop gracefully and start again on the same ports and WAL directory; the exit code."""
        exit_code = self.stop()
        self.start()
        return exit_code

    def running(self) -> bool:
        """Whether the current run's process is alive."""
        return self.runner.running()

    def logs(self) -> str:
        """What every run so far wrote, the current one last."""
        return self.runner.logs()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Return once grpc.health.v1 on the internal port says SERVING; PeerError if never.

        The peer serves nothing until our auth server has answered its start-up readiness
        check, so SERVING means the whole chain is up.
        """
        last: object = "no answer yet"
        with grpc.insecure_channel(self.internal_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                nonlocal last
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.RpcError as error:
                    last = error.code()
                else:
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                    last = answer.status
                if not self.running():
                    raise PeerError(f"peer {self.name} exited before serving\n{self.logs()}")
                return False

            try:
                wait_until_sync(serving, f"peer {self.name} serving", limit=timeout)
            except NeverHappenedError:
                raise PeerError(
                    f"peer {self.name} not SERVING after {timeout:g} s (last: {last})\n"
                    f"{self.logs()}"
                ) from None
