"""Fault injection: the misbehaviours a proxy must survive, drawn per request from a seeded RNG.

All faults are off by default. `FaultInjector` decides (without HTTP) what happens to each request -
a 5xx before any byte, a latency spike or a hang before the first byte, a stream cut after N
tokens, a crash after N requests - and whether /health may answer yet (slow start). The HTTP layer
only carries the plan out, so tests can check the decisions and their reproducibility directly.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import EmulatorConfig


@dataclass(frozen=True)
class FaultConfig:
    """Fault rates (probability per request) and sizes; all zero/None = no faults. Times are wall seconds."""

    error_rate: float = 0.0
    error_status: int = 503
    latency_spike_rate: float = 0.0
    latency_spike: float = 0.0
    hang_rate: float = 0.0
    cut_rate: float = 1.0
    cut_after: int | None = None
    crash_after: int | None = None
    slow_start: float = 0.0

    def __post_init__(self) -> None:
        for name in ("error_rate", "latency_spike_rate", "hang_rate", "cut_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"fault_{name} must be within [0, 1]")
        if not 500 <= self.error_status <= 599:
            raise ValueError("fault_error_status must be a 5xx status")
        if self.latency_spike < 0 or self.slow_start < 0:
            raise ValueError("fault_latency_spike and fault_slow_start must be >= 0")
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError("fault_cut_after must be >= 0")
        if self.crash_after is not None and self.crash_after < 0:
            raise ValueError("fault_crash_after must be >= 0")

    @classmethod
    def from_emulator(cls, config: EmulatorConfig) -> FaultConfig:
        return cls(
            error_rate=config.fault_error_rate,
            error_status=config.fault_error_status,
            latency_spike_rate=config.fault_latency_spike_rate,
            latency_spike=config.fault_latency_spike,
            hang_rate=config.fault_hang_rate,
            cut_rate=config.fault_cut_rate,
            cut_after=config.fault_cut_after,
            crash_after=config.fault_crash_after,
            slow_start=config.fault_slow_start,
        )

    @property
    def enabled(self) -> bool:
        return bool(
            self.error_rate or (self.latency_spike_rate and self.latency_spike) or self.hang_rate
            or (self.cut_after is not None and self.cut_rate) or self.crash_after is not None or self.slow_start
        )


@dataclass(frozen=True)
class FaultPlan:
    """What happens to one request. `crash` wins over everything; then error, hang, delay, cut."""

    crash: bool = False
    error_status: int | None = None
    hang: bool = False
    delay: float = 0.0
    cut_after: int | None = None

    @property
    def clean(self) -> bool:
        return self == NO_FAULT


NO_FAULT = FaultPlan()


class FaultInjector:
    """Seeded per-request fault decisions plus the request count and start time they depend on.

    Every request draws the same number of random numbers in the same order, so a seed reproduces
    the whole sequence of plans regardless of which faults fire.
    """

    def __init__(self, config: FaultConfig, seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._rng = random.Random(seed)
        self._clock = clock
        self.started = clock()
        self.num_requests = 0
        self.hanging = 0  # requests held by a hang right now (the server keeps this count)
        self.crash: Callable[[], None] | None = None
        self.counts = {"error": 0, "hang": 0, "spike": 0, "cut": 0, "crash": 0}

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def health_ok(self) -> bool:
        """False while the slow start lasts (like a server still loading its model)."""
        return self._clock() - self.started >= self.config.slow_start

    def plan(self) -> FaultPlan:
        """Decide the faults of the next request (call once per generation request)."""
        c = self.config
        self.num_requests += 1
        r_error, r_hang, r_spike, r_cut = (self._rng.random() for _ in range(4))
        if c.crash_after is not None and self.num_requests > c.crash_after:
            self.counts["crash"] += 1
            return FaultPlan(crash=True)
        if r_error < c.error_rate:
            self.counts["error"] += 1
            return FaultPlan(error_status=c.error_status)
        if r_hang < c.hang_rate:
            self.counts["hang"] += 1
            return FaultPlan(hang=True)
        delay = c.latency_spike if r_spike < c.latency_spike_rate and c.latency_spike > 0 else 0.0
        cut = c.cut_after if c.cut_after is not None and r_cut < c.cut_rate else None
        self.counts["spike"] += delay > 0
        self.counts["cut"] += cut is not None
        return FaultPlan(delay=delay, cut_after=cut)


def make_injector(config: EmulatorConfig) -> FaultInjector:
    return FaultInjector(FaultConfig.from_emulator(config), seed=config.seed)
