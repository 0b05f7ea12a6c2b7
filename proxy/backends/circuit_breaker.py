"""A circuit breaker per backend: stop sending requests to a backend that keeps failing them.

Health checks only see /health; a backend can pass them and still fail every request (5xx, hangs,
cut streams). After `failure_threshold` failed requests in a row the breaker opens and the backend
gets no traffic; after `cooldown` seconds it lets one request through at a time as a probe (half
open), and closes again after `success_threshold` successful probes. A failed probe re-opens it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from kvblocks import clock as _clock


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(eq=False)
class CircuitBreaker:
    """The breaker of one backend; `attempt()` before routing to it, then `success`/`failure`/`release`."""

    failure_threshold: int = 5
    cooldown: float = 5.0
    success_threshold: int = 2
    clock: Callable[[], float] = _clock.monotonic
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    probe_successes: int = 0
    probes_in_flight: int = 0
    opened_at: float = 0.0
    times_opened: int = 0
    last_change: float = field(default=0.0)

    def allows(self) -> bool:
        """May a request be routed here now? (An open breaker whose cool-down is over turns half-open.)"""
        s = self.state
        if s is BreakerState.CLOSED:
            return True
        if s is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self._set(BreakerState.HALF_OPEN)
            self.probe_successes = 0
        return self.probes_in_flight == 0

    def attempt(self) -> bool:
        """A request was routed here; returns True when it is a half-open probe."""
        if self.state is BreakerState.CLOSED:
            return False
        self.probes_in_flight += 1
        return True

    def success(self, probe: bool) -> None:
        """The backend answered (any status below 500, or a complete stream)."""
        self.consecutive_failures = 0
        if probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if self.state is BreakerState.HALF_OPEN:
                self.probe_successes += 1
                if self.probe_successes >= self.success_threshold:
                    self._set(BreakerState.CLOSED)

    def failure(self, probe: bool) -> None:
        """The backend failed the request (connect error, 5xx, timeout, cut stream)."""
        if probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self._open()

    def release(self, probe: bool) -> None:
        """The request ended without a verdict on the backend (the client left, or it was never sent)."""
        if probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def judge(self, probe: bool, verdict: bool | None) -> None:
        """How an attempt went: True served well, False failed, None no verdict (the client left)."""
        if verdict is None:
            self.release(probe)
        elif verdict:
            self.success(probe)
        else:
            self.failure(probe)

    def _open(self) -> None:
        self.opened_at = self.clock()
        self.times_opened += 1
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self.state = state
        self.last_change = self.clock()

    def describe(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "times_opened": self.times_opened,
            "probes_in_flight": self.probes_in_flight,
        }
