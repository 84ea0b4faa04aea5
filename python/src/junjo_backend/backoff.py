"""The one retry pace: jittered exponential backoff (the ingestion client and the poller)."""

from __future__ import annotations

import random

_MAX_DOUBLINGS = 30  # 2**30 times the first delay is past any ceiling in use


def backoff_delay(attempt: int, *, initial: float, ceiling: float) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    The bound doubles from `initial` up to `ceiling`; the delay is drawn from its upper
    half, so clients that lost the same server do not come back in step, and no retry
    comes back at once.
    """
    bound = min(ceiling, initial * 2 ** min(max(attempt, 1) - 1, _MAX_DOUBLINGS))
    return random.uniform(bound / 2, bound)  # noqa: S311 (jitter, not crypto)
