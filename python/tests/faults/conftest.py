"""The fault suite (`make faults`): real servers, real databases, the real Go peer, attacked.

Every test here is marked `faults` (added below), so `make test` skips them (pyproject's
`-m "not faults"`) and `make faults` runs only them. Each test records what it did in the
session's fault table, one row per scenario: the fault, how many times it was applied, and
the outcome measured. The table is printed at the end of the run and written to
`fault-results/faults.json`. Time bounds in these tests are hang guards with generous
slack; figures go in the table, not in assertions.

A scenario takes `kit` (its folder, the table, the key registry, the output folder, the
log settings, and the key set-up: `kit.store_keys`, `kit.probe_keys`) and, when it needs
the Go peer, `go_peer` (the image, the test's fleet, fresh ports).

Key-material watch: everything the suite's own servers and CLI calls write goes to files
under `fault_output.folder` (`fault_output.path(name)` gives a fresh file), every key a test
creates or sends is registered with `fault_keys.add`, and `fault_log_env()` gives the
environment of a server or CLI run: `LOG_LEVEL=DEBUG`, alternating text and JSON logs from
one call to the next. When the run ends, every file is scanned for every 12-character
substring of every key; a hit is a row in the table and fails the run. Database passwords
are watched the same way (`fault_keys.add_password`: as written and percent-encoded).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import docker  # type: ignore[import-untyped]  # docker-py ships no types
import pytest

from harness.peer import PeerImage, PeerPorts, ensure_image
from junjo_backend.auth.key_store import create_api_key, generate_api_key, revoke_api_key
from junjo_backend.database import close_engine, create_engine, init_schema
from tests.compat.peer import PeerContainer, PeerFleet
from tests.serve_process import SERVE, ServeProcess

from .recovery_helpers import ProbeKeys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

    from _pytest.terminal import TerminalReporter

_RESULTS_DIR = Path(__file__).resolve().parents[3] / "fault-results"


@dataclass(frozen=True, slots=True)
class FaultRow:
    """One scenario of the fault suite."""

    fault: str
    count: str
    outcome: str


@dataclass(slots=True)
class FaultTable:
    """The rows recorded by this run, in the order the tests added them."""

    rows: list[FaultRow] = field(default_factory=list)

    def add(self, fault: str, count: object, outcome: str) -> None:
        """Record a scenario: what was done, how often (a number or a short phrase), the result."""
        self.rows.append(FaultRow(fault=fault, count=str(count), outcome=outcome))

    def render(self) -> str:
        """The table as aligned plain text."""
        header = FaultRow("fault", "count", "outcome")
        rows = [header, *self.rows]
        widths = [max(len(getattr(row, name)) for row in rows) for name in ("fault", "count")]
        lines = [
            f"{row.fault:<{widths[0]}}  {row.count:>{widths[1]}}  {row.outcome}" for row in rows
        ]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)


_LEAK_WINDOW = 12  # characters of a key that must never appear anywhere


@dataclass(slots=True)
class KeyRegistry:
    """Every key material the suite created or sent (valid, revoked, random, mutated)."""

    keys: set[str] = field(default_factory=set)

    def add(self, key: str | bytes) -> None:
        """Watch for `key` (bytes are decoded leniently, as a log line would show them)."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        if len(text) >= _LEAK_WINDOW:
            self.keys.add(text)

    def add_password(self, password: str) -> None:
        """Watch for a database password, as written and as a URL carries it (percent-encoded).

        It must be long enough to be watched: a shorter one would escape the scan unseen.
        """
        if len(password) < _LEAK_WINDOW:
            raise ValueError(f"a watched password needs {_LEAK_WINDOW} characters or more")
        self.add(password)
        self.add(quote(password, safe=""))

    def windows(self) -> set[str]:
        """Every 12-character substring of every key."""
        return {
            key[start : start + _LEAK_WINDOW]
            for key in self.keys
            for start in range(len(key) - _LEAK_WINDOW + 1)
        }


@dataclass(slots=True)
class OutputFolder:
    """Where the suite's servers and CLI calls write their stdout and stderr."""

    folder: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def path(self, name: str) -> Path:
        """A new file for one process's output (`name` says which; a number keeps it unique)."""
        return self.folder / f"{next(self._names):04d}-{name}.log"

    def scan(self, windows: set[str]) -> list[str]:
        """`file: window` for every key window found in any output file."""
        hits: list[str] = []
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file():
                continue
            text = path.read_bytes().decode("utf-8", "replace")
            hits.extend(f"{path.name}: {window}" for window in windows if window in text)
        return hits


@dataclass(slots=True)
class _Run:
    table: FaultTable
    keys: KeyRegistry
    output: OutputFolder
    formats: Iterator[str]


_RUN = pytest.StashKey[_Run]()


def pytest_configure(config: pytest.Config) -> None:
    """One table, one key registry and one output folder per run."""
    folder = Path(tempfile.mkdtemp(prefix="junjo-faults-output-"))
    config.stash[_RUN] = _Run(
        table=FaultTable(),
        keys=KeyRegistry(),
        output=OutputFolder(folder),
        formats=itertools.cycle(("json", "text")),
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder `faults`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def fault_table(request: pytest.FixtureRequest) -> FaultTable:
    """The run's fault table; add one row per scenario."""
    return request.config.stash[_RUN].table


@pytest.fixture
def fault_keys(request: pytest.FixtureRequest) -> KeyRegistry:
    """Register here every key a test creates or sends."""
    return request.config.stash[_RUN].keys


@pytest.fixture
def fault_output(request: pytest.FixtureRequest) -> OutputFolder:
    """Send every server's and CLI call's stdout and stderr to a file from here."""
    return request.config.stash[_RUN].output


@pytest.fixture
def fault_log_env(request: pytest.FixtureRequest) -> Callable[[], dict[str, str]]:
    """Logging settings for one server or CLI run: DEBUG, JSON and text in turn."""
    run = request.config.stash[_RUN]

    def env() -> dict[str, str]:
        return {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": next(run.formats)}

    return env


@pytest.fixture(scope="module")
def peer_image() -> Iterator[PeerImage]:
    """The Go peer's image (built once per source hash)."""
    client = docker.from_env()
    try:
        yield ensure_image(client)
    finally:
        # Each test's fleet removes its own containers; a session-wide sweep here could
        # remove another fault module's peers.
        client.close()


@pytest.fixture
async def fleet(
    peer_image: PeerImage, tmp_path: Path, fault_output: OutputFolder
) -> AsyncIterator[PeerFleet]:
    """Go peer containers for one test; their logs go to the output folder at the end."""
    registry: list[PeerContainer] = []
    fleet = PeerFleet(peer_image, tmp_path, registry)
    try:
        yield fleet
    finally:
        await fleet.close()
        for peer in registry:
            fault_output.path(f"{peer.name}-container").write_text(peer.logs())


@dataclass(frozen=True, slots=True)
class FaultKit:
    """One scenario's surroundings: its folder, what it reports through, its key set-up.

    Every key made here is registered for the end-of-run scan.
    """

    folder: Path  # the test's tmp_path
    table: FaultTable
    keys: KeyRegistry
    output: OutputFolder
    log_env: Callable[[], dict[str, str]]

    def serve(
        self, env: Mapping[str, str], *, name: str, command: Sequence[str] = SERVE
    ) -> ServeProcess:
        """`serve` (or `command`) in the test's folder, each run's output to a file from
        `output`, its log settings from `log_env` and its number in `JUNJO_FAULT_RUN`."""
        return ServeProcess(
            env,
            cwd=self.folder,
            output=self.output.path,
            command=command,
            name=name,
            per_run=self.run_env,
        )

    def run_env(self, run: int) -> dict[str, str]:
        """The environment of a server's run number `run`: log settings and the number."""
        return {**self.log_env(), "JUNJO_FAULT_RUN": str(run)}

    def sqlite_url(self, name: str = "junjo.db") -> str:
        """The URL of a SQLite file in the test's folder."""
        return f"sqlite+aiosqlite:///{self.folder / name}"

    async def store_keys(self, database_url: str, count: int, name: str = "fault") -> list[str]:
        """Create the schema and `count` API keys (registered); the keys, for the test to send."""
        engine = create_engine(database_url)
        try:
            await init_schema(engine)
            keys = [(await create_api_key(engine, f"{name}-{n}")).key for n in range(count)]
        finally:
            await close_engine(engine)
        for key in keys:
            self.keys.add(key)
        return keys

    async def probe_keys(self, database_url: str) -> ProbeKeys:
        """A valid key, a revoked one (both in the database) and 16 unknown ones, registered."""
        engine = create_engine(database_url)
        try:
            await init_schema(engine)
            valid = await create_api_key(engine, "fault probe valid")
            revoked = await create_api_key(engine, "fault probe revoked")
            await revoke_api_key(engine, revoked.id)
        finally:
            await close_engine(engine)
        keys = ProbeKeys(valid, revoked, tuple(generate_api_key() for _ in range(16)))
        for key in (valid.key, revoked.key, *keys.unknown):
            self.keys.add(key)
        return keys


@pytest.fixture
def kit(
    tmp_path: Path,
    fault_table: FaultTable,
    fault_keys: KeyRegistry,
    fault_output: OutputFolder,
    fault_log_env: Callable[[], dict[str, str]],
) -> FaultKit:
    """What every scenario uses: see FaultKit."""
    return FaultKit(tmp_path, fault_table, fault_keys, fault_output, fault_log_env)


@dataclass(frozen=True, slots=True)
class GoPeer:
    """The Go peer for one scenario: its image and the test's fleet of containers."""

    image: PeerImage
    fleet: PeerFleet

    def ports(self) -> PeerPorts:
        """Free ports for a peer and the backend it dials (the published image's, if not ours)."""
        return PeerPorts.pick(self.image)


@pytest.fixture
def go_peer(peer_image: PeerImage, fleet: PeerFleet) -> GoPeer:
    """The Go peer (built once per module, containers removed after the test)."""
    return GoPeer(peer_image, fleet)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Scan everything the suite's processes wrote for key material; a hit fails the run."""
    run = session.config.stash.get(_RUN, None)
    if run is None or not run.keys.keys:
        return
    files = [path for path in run.output.folder.rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    hits = run.output.scan(run.keys.windows())
    run.table.add(
        "key material in output (12-char windows)",
        f"{len(run.keys.keys)} keys, {len(files)} files, {size} bytes",
        "0 hits" if not hits else f"FAILED: {len(hits)} hits, e.g. {hits[0]}",
    )
    if hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    """Print the table and write it as JSON."""
    run = config.stash.get(_RUN, None)
    table = None if run is None else run.table
    if table is None or not table.rows:
        return
    terminalreporter.section("fault table")
    terminalreporter.write_line(table.render())
    results_dir = Path(os.environ.get("JUNJO_FAULT_RESULTS_DIR", _RESULTS_DIR))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "faults.json").write_text(
        json.dumps([asdict(row) for row in table.rows], indent=2) + "\n"
    )
