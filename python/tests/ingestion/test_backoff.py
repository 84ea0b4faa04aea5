"""The one retry pace both the ingestion client and the poller use."""

from __future__ import annotations

from junjo_backend.backoff import backoff_delay


def test_the_bound_doubles_up_to_the_ceiling_and_the_delay_is_its_upper_half() -> None:
    for attempt, bound in [(1, 0.1), (2, 0.2), (3, 0.4), (6, 3.2), (7, 5.0), (400, 5.0)]:
        delays = [backoff_delay(attempt, initial=0.1, ceiling=5.0) for _ in range(200)]
        assert all(bound / 2 <= delay <= bound for delay in delays), (attempt, bound)
        assert len(set(delays)) > 1  # jittered


def test_an_attempt_below_one_counts_as_the_first() -> None:
    assert 0.05 <= backoff_delay(0, initial=0.1, ceiling=5.0) <= 0.1
