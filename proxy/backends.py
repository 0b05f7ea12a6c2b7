"""Backends the proxy routes to: health, the proxy's own in-flight requests, and scraped vLLM load.

A request counts as load from the moment it is routed (not when the backend reports it), so a
burst cannot pile onto one backend between two metric scrapes. Work estimates use the latency
profile of `emulator.latency` in emulated seconds; `time_scale` converts wall time to them.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from emulator.latency import LatencyProfile

from .circuit_breaker import CircuitBreaker


@dataclass
class InFlight:
    """One request routed to a backend and not yet finished."""

    id: int
    backend: Backend
    prompt_blocks: float
    uncached_blocks: float
    max_tokens: int
    prefill_s: float
    expected_first_token: float  # wall-clock monotonic time the prefill is expected to be done
    routed_at: float
    first_byte_at: float | None = None


@dataclass
class ScrapedLoad:
    """What the backend's /metrics said last (None = never scraped or not exposed)."""

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    hash_algo: str | None = None
    at: float = 0.0


@dataclass(eq=False)
class Backend:
    """A backend URL plus everything routing needs to know about it."""

    url: str
    healthy: bool = True
    failures: int = 0
    last_error: str | None = None
    models: list[str] | None = None
    api_key: str | None = field(default=None, repr=False)  # sent upstream; never in logs or reprs
    auth_error: str | None = None  # set while the backend rejects our credentials
    max_model_len: int | None = None
    scraped: ScrapedLoad = field(default_factory=ScrapedLoad)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    processed: int = 0
    requests: dict[int, InFlight] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What every request to this backend carries: its API key (vLLM --api-key guards /v1/*)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    # -- load estimates (emulated seconds) -------------------------------------------------------
    def pending_prefill(self, now: float) -> tuple[float, int]:
        """Prefill seconds of in-flight requests not yet past their first token, and how many."""
        total = 0.0
        n = 0
        for r in self.requests.values():
            if r.first_byte_at is None and now < r.expected_first_token:
                total += r.prefill_s
                n += 1
        return total, n

    def queue_state(self, now: float, decode_per_token: float, time_scale: float) -> tuple[float, int, float]:
        """(pending prefill seconds, requests still prefilling, decode tokens left across in-flight requests)."""
        total = 0.0
        n = 0
        tokens = 0.0
        for r in self.requests.values():
            if r.first_byte_at is None:
                if now < r.expected_first_token:
                    total += r.prefill_s
                    n += 1
                tokens += r.max_tokens
            else:
                done = _elapsed(now - r.first_byte_at, time_scale) / decode_per_token if decode_per_token > 0 else r.max_tokens
                if done < r.max_tokens:
                    tokens += r.max_tokens - done
        return total, n, tokens

    def outstanding_work(self, now: float, profile: LatencyProfile, time_scale: float) -> float:
        """Remaining prefill + decode seconds of in-flight requests, as if run one after another."""
        total = 0.0
        dpt = profile.decode_per_token
        for r in self.requests.values():
            est = r.prefill_s + max(0, r.max_tokens - 1) * dpt
            total += max(0.0, est - _elapsed(now - r.routed_at, time_scale))
        return total


def _elapsed(wall: float, time_scale: float) -> float:
    return wall / time_scale if time_scale > 0 else float("inf")


class BackendRegistry:
    """The backends in configuration order; the healthy list is cached because routing reads it per request."""

    def __init__(self, breaker_factory: Callable[[], CircuitBreaker] = CircuitBreaker) -> None:
        self.breaker_factory = breaker_factory
        self._backends: dict[str, Backend] = {}
        self._healthy: list[Backend] = []
        self._ids = itertools.count(1)

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def __contains__(self, url: str) -> bool:
        return url in self._backends

    def get(self, url: str) -> Backend | None:
        return self._backends.get(url)

    def add(self, url: str) -> tuple[Backend, bool]:
        """Add a backend (healthy until a check says otherwise); returns (backend, created)."""
        b = self._backends.get(url)
        if b is not None:
            return b, False
        b = Backend(url, breaker=self.breaker_factory())
        self._backends[url] = b
        self._refresh()
        return b, True

    def remove(self, url: str) -> Backend | None:
        b = self._backends.pop(url, None)
        if b is not None:
            self._refresh()
        return b

    def healthy(self) -> list[Backend]:
        return self._healthy

    def set_health(self, b: Backend, healthy: bool, error: str | None = None) -> bool:
        """Returns True when the state changed."""
        if healthy:
            b.failures = 0
            b.last_error = None
        else:
            b.failures += 1
            b.last_error = error
        if b.healthy == healthy:
            return False
        b.healthy = healthy
        self._refresh()
        return True

    def _refresh(self) -> None:
        self._healthy = [b for b in self._backends.values() if b.healthy]

    def new_request_id(self) -> int:
        return next(self._ids)

    def total_in_flight(self) -> int:
        return sum(b.in_flight for b in self._backends.values())


def now() -> float:
    return time.monotonic()
