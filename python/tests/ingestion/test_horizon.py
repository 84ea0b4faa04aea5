"""The settle horizon's arithmetic: what a sighting settles, and when a stop may prove caught up."""

from __future__ import annotations

import math

from junjo_backend.poller.horizon import CLOCK_RATE_TOLERANCE, SettleHorizon

WINDOW_MS = 1000


def aged(cutoff_ms: float, age_ms: float) -> int:
    """A cutoff from a sighting `age_ms` old: widened by the clocks' rate tolerance."""
    return math.floor(cutoff_ms - age_ms * CLOCK_RATE_TOLERANCE)


def test_a_key_seen_settles_everything_up_to_it_a_window_later() -> None:
    horizon = SettleHorizon(WINDOW_MS)
    assert horizon.cutoff(10_000) is None
    # Key time 3,000 on the ingestion clock, seen at 5,000 on ours: offset at most 2,000.
    horizon.see(3_000, 5_000)
    assert horizon.known
    assert horizon.cutoff(5_000) == 3_000 - WINDOW_MS
    assert horizon.cutoff(5_000 + WINDOW_MS) == aged(3_000, WINDOW_MS)
    # A worse sighting (a larger offset) changes nothing; a better one tightens the offset.
    horizon.see(3_100, 9_000)
    assert horizon.cutoff(6_000) == aged(3_000, 1_000)
    horizon.see(4_900, 6_000)
    assert horizon.cutoff(6_000) == 4_900 - WINDOW_MS


def test_a_sighting_that_does_not_mature_tightens_the_offset_only() -> None:
    """A standby's probe: its key says when entries settle, but not that a stop proves much."""
    horizon = SettleHorizon(WINDOW_MS)
    horizon.see(3_000, 5_000, matures=False)
    assert horizon.cutoff(5_000 + WINDOW_MS) == aged(3_000, WINDOW_MS)
    assert not horizon.settled_once(5_000 + 10 * WINDOW_MS)
    horizon.see(20_000, 21_000)  # the drain's own first read
    assert not horizon.settled_once(21_000 + WINDOW_MS - 1)
    assert horizon.settled_once(21_000 + WINDOW_MS)
