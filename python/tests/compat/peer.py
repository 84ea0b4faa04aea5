"""The Go ingestion peer as the contract suite runs it: its image and its containers.

The image is built from go-compat-tests/ (a static binary copied into `FROM scratch`) and
tagged with a hash of the Go sources, so a second session with unchanged sources reuses it.
`JUNJO_COMPAT_INGESTION_IMAGE` names another image to run instead, such as the published
`mdrideout/junjo-server-ingestion:latest`: that image listens on the fixed ports 50051 and
50052 and dials the fixed host `junjo-server-backend:50053`, so its containers get an
/etc/hosts entry pointing that name at 127.0.0.1 and our auth server must listen on 50053.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker.errors  # type: ignore[import-untyped]  # docker-py ships no types
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from testcontainers.core.container import DockerContainer
from testcontainers.core.image import DockerImage

REPO_ROOT = Path(__file__).resolve().parents[3]
GO_MODULE = REPO_ROOT / "go-compat-tests"
IMAGE_CONTEXT = GO_MODULE / "image"
IMAGE_ENV = "JUNJO_COMPAT_INGESTION_IMAGE"
IMAGE_REPOSITORY = "junjo-compat/ingestion-peer"
SOURCE_HASH_LABEL = "org.junjo-backend.compat.source-hash"
SESSION_LABEL = "org.junjo-backend.compat.session"
# What the published image dials; the containers of such an image resolve it to loopback.
PUBLISHED_BACKEND_HOST = "junjo-server-backend"
PUBLISHED_PORTS = (50051, 50052, 50053)
WAL_MOUNT = "/wal"
# Every container this process starts carries this label, so the session can sweep them.
SESSION_ID = uuid.uuid4().hex
STOP_TIMEOUT_SECONDS = 10
_BUILD_TIMEOUT_SECONDS = 600


# The peers a node (test, module) started, for the failure report.
PEERS = pytest.StashKey[list["PeerContainer"]]()


def peer_registry(node: pytest.Item | pytest.Collector) -> list[PeerContainer]:
    """The list where `node`'s peers are recorded (the report hook reads it)."""
    return node.stash.setdefault(PEERS, [])


class PeerError(Exception):
    """The peer container did not do what the suite needs; the message carries its logs."""


@dataclass(frozen=True, slots=True)
class PeerImage:
    """The image the suite runs, and whether it is ours (ports and backend address are settings)."""

    tag: str
    built_here: bool


@dataclass(frozen=True, slots=True)
class PeerPorts:
    """Loopback ports: the peer's public (OTLP) and internal (ReadSpans) ones, our auth server's."""

    public: int
    internal: int
    backend: int

    @classmethod
    def pick(cls, image: PeerImage) -> PeerPorts:
        """Free ports for our image, else the published image's fixed ones (PeerError if taken)."""
        if not image.built_here:
            ensure_ports_free(PUBLISHED_PORTS, image.tag)
            return cls(*PUBLISHED_PORTS)
        return cls(*free_ports(3))


def ensure_ports_free(ports: tuple[int, ...], image: str) -> None:
    """PeerError naming each of `ports` that something already listens on (127.0.0.1)."""
    taken = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As a server binds: connections of an earlier run in TIME_WAIT do not count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                taken.append(str(port))
    if taken:
        raise PeerError(
            f"loopback port(s) {', '.join(taken)} already in use. {image} is not our peer "
            f"image, so it runs on the published image's fixed ports ({PUBLISHED_PORTS[0]} "
            f"public, {PUBLISHED_PORTS[1]} internal) and dials our auth server on "
            f"{PUBLISHED_PORTS[2]}: stop what holds them (another run of the suite?) and retry."
        )


def free_ports(count: int) -> list[int]:
    """`count` loopback ports that were free a moment ago (the peer binds them in its own process).

    All are held at once while they are picked, so the kernel cannot hand out one twice.
    """
    with contextlib.ExitStack() as held:
        socks = [
            held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


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
        _build_image(tag, source)
        _remove_stale_images(client, keep=tag)
    return PeerImage(tag, built_here=True)


def _build_image(tag: str, source: str) -> None:
    go = shutil.which("go")
    if go is None:
        raise PeerError("the `go` toolchain is not on PATH: it builds the ingestion peer image")
    with tempfile.TemporaryDirectory(prefix="ingestion-peer-image-") as context:
        for name in ("Dockerfile", ".dockerignore"):
            shutil.copy(IMAGE_CONTEXT / name, Path(context) / name)
        build = subprocess.run(
            [
                go,
                "build",
                "-trimpath",
                "-o",
                str(Path(context) / "ingestion-peer"),
                "./cmd/ingestion-peer",
            ],
            cwd=GO_MODULE,
            env={**os.environ, "CGO_ENABLED": "0"},
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        if build.returncode != 0:
            raise PeerError(f"go build of the ingestion peer failed:\n{build.stderr}")
        # clean_up=False: the image must outlive this build context (it is the cache).
        DockerImage(
            path=context, tag=tag, clean_up=False, labels={SOURCE_HASH_LABEL: source}
        ).build()


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


def _is_running(container: DockerContainer) -> bool:
    try:
        container.reload()
    except docker.errors.NotFound:
        return False
    return container.status == "running"


class PeerContainer:
    """Runs of the peer image on host networking, all with the same ports and WAL directory.

    `start` and `stop` may alternate (a restart keeps the WAL); `logs` covers every run.
    """

    def __init__(self, image: PeerImage, ports: PeerPorts, wal_dir: Path, name: str) -> None:
        self.image = image
        self.ports = ports
        self.wal_dir = wal_dir
        self.name = name
        self._container: DockerContainer | None = None
        self._past_logs: list[str] = []
        self._runs = 0

    @property
    def public_address(self) -> str:
        """Where OTLP exporters send spans."""
        return f"127.0.0.1:{self.ports.public}"

    @property
    def internal_address(self) -> str:
        """Where the backend reads spans (ReadSpans) and probes health."""
        return f"127.0.0.1:{self.ports.internal}"

    def _definition(self) -> DockerContainer:
        self.wal_dir.mkdir(parents=True, exist_ok=True)
        container = (
            DockerContainer(self.image.tag)
            .with_envs(
                GRPC_PORT=str(self.ports.public),
                INTERNAL_GRPC_PORT=str(self.ports.internal),
                BADGERDB_PATH=WAL_MOUNT,
            )
            .with_volume_mapping(str(self.wal_dir), WAL_MOUNT, "rw")
        )
        kwargs: dict[str, object] = {
            "network_mode": "host",
            # WAL files then belong to whoever runs the tests, and tmp_path can delete them.
            "user": f"{os.getuid()}:{os.getgid()}",
            "labels": {SESSION_LABEL: SESSION_ID},
        }
        if self.image.built_here:
            container.with_envs(
                BACKEND_GRPC_ADDRESS=f"127.0.0.1:{self.ports.backend}",
                LISTEN_HOST="127.0.0.1",
                LOG_LEVEL="debug",
            )
        else:
            # Another image dials the fixed host name of the deployed service.
            kwargs["extra_hosts"] = {PUBLISHED_BACKEND_HOST: "127.0.0.1"}
        return container.with_kwargs(**kwargs)

    async def start(self) -> None:
        """Start a run; it serves once our auth server has answered its readiness check."""
        if self._container is not None:
            raise RuntimeError(f"peer {self.name} is already running")
        self._runs += 1
        self._container = await asyncio.to_thread(self._definition().start)

    async def stop(self) -> int | None:
        """SIGTERM, wait for a clean exit (SIGKILL after 10 s), remove; the exit code."""
        container = self._container
        if container is None:
            return None
        self._container = None
        return await asyncio.to_thread(self._stop, container)

    def _stop(self, container: DockerContainer) -> int | None:
        wrapped = container.get_wrapped_container()
        exit_code: int | None = None
        try:
            wrapped.stop(timeout=STOP_TIMEOUT_SECONDS)
            exit_code = int(wrapped.wait(timeout=STOP_TIMEOUT_SECONDS)["StatusCode"])
        finally:
            self._past_logs.append(self._run_logs(container, self._runs))
            container.stop(force=True)
        return exit_code

    async def restart(self) -> int | None:
        """Stop gracefully and start again on the same ports and WAL directory; the exit code."""
        exit_code = await self.stop()
        await self.start()
        return exit_code

    async def running(self) -> bool:
        """Whether the current run's process is alive."""
        container = self._container
        if container is None:
            return False
        return await asyncio.to_thread(_is_running, container)

    async def wait_serving(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 (a bound on polling, not one call)
        """Return once grpc.health.v1 on the internal port says SERVING; PeerError if never."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        last: object = "no answer yet"
        async with grpc.aio.insecure_channel(self.internal_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.aio.AioRpcError as error:
                    last = error.code()
                else:
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = answer.status
                if not await self.running():
                    raise PeerError(f"peer {self.name} exited before serving\n{self.logs()}")
                if loop.time() > give_up:
                    raise PeerError(
                        f"peer {self.name} not SERVING after {timeout:g} s (last: {last})\n"
                        f"{self.logs()}"
                    )
                await asyncio.sleep(0.1)

    def logs(self) -> str:
        """stdout and stderr of every run so far, the current one last."""
        parts = list(self._past_logs)
        if self._container is not None:
            parts.append(self._run_logs(self._container, self._runs))
        return "\n".join(parts)

    def _run_logs(self, container: DockerContainer, run: int) -> str:
        try:
            stdout, stderr = container.get_logs()
        except docker.errors.APIError as error:
            return f"--- run {run}: logs unavailable: {error}"
        text = (stdout + stderr).decode(errors="replace")
        return f"--- {self.name} run {run} ({self.image.tag}) ---\n{text}"


class PeerFleet:
    """The peer containers of one test or module: each removed at `close`, logs kept for reports."""

    def __init__(self, image: PeerImage, base_dir: Path, registry: list[PeerContainer]) -> None:
        self.image = image
        self._base_dir = base_dir
        self._registry = registry
        self._peers: list[PeerContainer] = []

    async def launch(
        self, ports: PeerPorts, *, wal_dir: Path | None = None, wait: bool = True
    ) -> PeerContainer:
        """Start a peer (its WAL in a new folder unless given); by default wait until it serves."""
        number = len(self._peers) + 1
        peer = PeerContainer(
            self.image, ports, wal_dir or self._base_dir / f"wal-{number}", name=f"peer-{number}"
        )
        self._peers.append(peer)
        self._registry.append(peer)
        await peer.start()
        if wait:
            await peer.wait_serving()
        return peer

    async def close(self) -> None:
        """Stop and remove every peer this fleet started."""
        for peer in self._peers:
            await peer.stop()
