"""The fault suite (`make faults`): real servers, real databases, the real Go peer, attacked.

Every test here is marked `faults` (added below), so `make test` skips them (pyproject's
`-m "not faults"`) and `make faults` runs only them. Each test records what it did in the
session's fault table, one row per scenario: the fault, how many times it was applied, and
the outcome measured. The table is printed at the end of the run and written to
`fault-results/faults.json`. Time bounds in these tests are hang guards with generous
slack; figures go in the table, not in assertions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
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


_TABLE = pytest.StashKey[FaultTable]()


def pytest_configure(config: pytest.Config) -> None:
    """One table per run."""
    config.stash[_TABLE] = FaultTable()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder `faults`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def fault_table(request: pytest.FixtureRequest) -> FaultTable:
    """The run's fault table; add one row per scenario."""
    return request.config.stash[_TABLE]


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    """Print the table and write it as JSON."""
    table = config.stash.get(_TABLE, None)
    if table is None or not table.rows:
        return
    terminalreporter.section("fault table")
    terminalreporter.write_line(table.render())
    results_dir = Path(os.environ.get("JUNJO_FAULT_RESULTS_DIR", _RESULTS_DIR))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "faults.json").write_text(
        json.dumps([asdict(row) for row in table.rows], indent=2) + "\n"
    )
