"""The settle horizon: which WAL entries have settled, with no trust in two clocks agreeing.

An entry whose key is stamped t (the ingestion-service's clock) counts as settled once this
process has seen a key K for W (`POLLER_SETTLE_SECONDS`) of its own monotonic time past
t_K - t, or has read, in the same snapshot, a key W newer than t. Both rules are one
number: the smallest `seen_at - t_K` over the keys seen (an upper bound of the offset
between the two clocks). How far apart the wall clocks are never enters. The reasoning, and
what it assumes of the clocks, is in docs/design/settle-window.md.
"""

from __future__ import annotations

import math
import time

# The two clocks may tick at rates this far apart (NTP slews a clock by at most 500 ppm,
# either way): an old sighting's offset is widened by it, so a drifting clock stays safe.
CLOCK_RATE_TOLERANCE = 1e-3


def monotonic_ms() -> float:
    """Milliseconds of this process's monotonic clock."""
    return time.monotonic() * 1000


class SettleHorizon:
    """The best sighting of a key, and what it says about every other key."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._offset_ms: float | None = None  # seen_at - key time, of the best sighting
        self._seen_at_ms = 0.0
        self._first_seen_at_ms: float | None = None  # the first sighting of all

    @property
    def known(self) -> bool:
        """Whether any key has been seen (before that, nothing has settled by this rule)."""
        return self._offset_ms is not None

    def settled_once(self, at_ms: float) -> bool:
        """Whether a key seen first of all has had W since: before that, what is held may be old.

        Until then the offset is only an upper bound taken from whatever keys came first (a
        backlog's, at start-up), so entries waiting to settle cannot be told from new ones.
        """
        first = self._first_seen_at_ms
        return first is not None and at_ms - first >= self.window_ms

    def _offset_at(self, at_ms: float) -> float | None:
        """The best offset as of `at_ms`, widened for the clocks' rate difference since."""
        if self._offset_ms is None:
            return None
        return self._offset_ms + max(0.0, at_ms - self._seen_at_ms) * CLOCK_RATE_TOLERANCE

    def see(self, key_ms: int, seen_at_ms: float, *, matures: bool = True) -> None:
        """A key of this time was received at `seen_at_ms` (so it was committed by then).

        `matures=False`: a sighting that is not a read of the drain's own (a standby's
        probe) tightens the offset but does not start `settled_once`'s window.
        """
        offset = seen_at_ms - key_ms
        if matures and self._first_seen_at_ms is None:
            self._first_seen_at_ms = seen_at_ms
        best = self._offset_at(seen_at_ms)
        if best is None or offset <= best:
            self._offset_ms, self._seen_at_ms = offset, seen_at_ms

    def cutoff(self, at_ms: float) -> int | None:
        """Key time (ms) at or below which every entry has settled for a read started at `at_ms`.

        None while no key has been seen.
        """
        offset = self._offset_at(at_ms)
        if offset is None:
            return None
        return math.floor(at_ms - offset) - self.window_ms

    def key_clock(self, at_ms: float) -> float | None:
        """The ingestion-service's clock at `at_ms` (ms) as the sightings show it: a lower bound."""
        offset = self._offset_at(at_ms)
        return None if offset is None else at_ms - offset
