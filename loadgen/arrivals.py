"""Arrival processes: when each chain of requests starts.

Open loop: `PoissonArrivals` (exponential gaps at a rate) and `TraceArrivals` (the trace's own
offsets) give start times independent of how fast the server answers. Closed loop:
`ConcurrencyArrivals` keeps a fixed number of chains in flight. Times are emulated seconds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .workloads import RequestSpec


@dataclass(frozen=True)
class PoissonArrivals:
    """Chains start with exponential gaps at `rate` per emulated second (seeded)."""

    rate: float
    seed: int = 0

    def start_times(self, chains: list[list[RequestSpec]]) -> list[float]:
        rng = random.Random(repr((self.seed, "poisson")))
        t, out = 0.0, []
        for _ in chains:
            out.append(t)
            t += rng.expovariate(self.rate)
        return out

    def describe(self) -> str:
        return f"Poisson {self.rate:g} req/s"


@dataclass(frozen=True)
class BurstArrivals:
    """Bursts of `burst` consecutive chains starting together (a few ms apart), bursts Poisson at
    rate / burst, so the mean rate is `rate`; workloads order chains so a burst shares a prefix."""

    rate: float
    burst: int
    seed: int = 0
    spread: float = 0.002  # emulated seconds between the requests of one burst

    def start_times(self, chains: list[list[RequestSpec]]) -> list[float]:
        rng = random.Random(repr((self.seed, "burst")))
        t, out = 0.0, []
        for i in range(len(chains)):
            if i and i % self.burst == 0:
                t += rng.expovariate(self.rate / self.burst)
            out.append(t + (i % self.burst) * self.spread)
        return out

    def describe(self) -> str:
        return f"bursts of {self.burst}, Poisson {self.rate:g} req/s on average"


@dataclass(frozen=True)
class TraceArrivals:
    """Chains start at their first request's `arrival` offset (set by the trace workload, or b2b-saas's
    Poisson stages)."""

    label: str = "trace timestamps"

    def start_times(self, chains: list[list[RequestSpec]]) -> list[float]:
        return [c[0].arrival or 0.0 for c in chains]

    def describe(self) -> str:
        return self.label


# Workloads that set their own arrival times, used unless a rate or concurrency is given.
OWN_ARRIVALS = {"trace": "trace timestamps", "b2b-saas": "Poisson stages (the workload's ramp)"}


@dataclass(frozen=True)
class ConcurrencyArrivals:
    """Closed loop: `concurrency` workers each run one chain at a time, back to back."""

    concurrency: int

    def describe(self) -> str:
        return f"concurrency {self.concurrency}"


Arrivals = PoissonArrivals | BurstArrivals | TraceArrivals | ConcurrencyArrivals


def make_arrivals(workload_name: str, rate: float, concurrency: int, seed: int, burst: int = 1) -> Arrivals:
    """A rate gives Poisson (in bursts when `burst` > 1), a concurrency a closed loop; otherwise the
    workload's own times (trace, b2b-saas), or concurrency 1."""
    if workload_name in OWN_ARRIVALS and not concurrency and not rate:
        return TraceArrivals(OWN_ARRIVALS[workload_name])
    if rate > 0:
        return BurstArrivals(rate, burst, seed) if burst > 1 else PoissonArrivals(rate, seed)
    return ConcurrencyArrivals(max(1, concurrency))
