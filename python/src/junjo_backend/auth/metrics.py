"""ValidateApiKey outcomes, counted as calls happen on label children bound once.

A call costs one counter increment and one histogram observation. No label comes from a key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

# A snapshot answer takes tens of microseconds in the handler; a call that waits for a
# database read takes milliseconds, up to the read timeout (2 s).
_AUTH_LATENCY_BUCKETS = (
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The counter and histogram children of one ValidateApiKey outcome, bound once."""

    calls: Counter
    latency: Histogram

    def observe(self, started: float) -> None:
        """Count one call that started at `started` (`time.perf_counter()`) and ends now."""
        self.calls.inc()
        self.latency.observe(time.perf_counter() - started)


class AuthCallMetrics:
    """ValidateApiKey calls by outcome, with their latency in the handler."""

    def __init__(self, registry: CollectorRegistry) -> None:
        calls = Counter(
            "junjo_auth_validate_calls",
            "ValidateApiKey calls answered, by outcome: valid, invalid (is_valid=false), "
            "error (a status other than OK)",
            ["outcome"],
            registry=registry,
        )
        latency = Histogram(
            "junjo_auth_validate_duration_seconds",
            "Time ValidateApiKey spent in the handler, by outcome",
            ["outcome"],
            buckets=_AUTH_LATENCY_BUCKETS,
            registry=registry,
        )
        self.valid = _Outcome(calls.labels("valid"), latency.labels("valid"))
        self.invalid = _Outcome(calls.labels("invalid"), latency.labels("invalid"))
        self.error = _Outcome(calls.labels("error"), latency.labels("error"))
