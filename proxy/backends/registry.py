"""Backends the proxy routes to: health, the proxy's own in-flight requests, and scraped vLLM load.

A request counts as load from the moment it is routed (not when the backend reports it), so a
burst cannot pile onto one backend between two metric scrapes. Work estimates use the latency
profile of `kvblocks.latency` in emulated seconds; `time_scale` converts wall time to them.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvblocks import clock
from kvblocks.latency import LatencyProfile

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
    # Wall seconds its whole decode takes at batch 1 (max_tokens x decode_per_token x time_scale).
    decode_wall: float = 0.0
    held_blocks: float = 0.0  # KV blocks it adds to the pinned ones while running: uncached prompt + output
    phase: int = 0  # one of the PHASE_* constants below: which running totals it is counted in
    decode_end: float = 0.0
    lora: str | None = None  # the LoRA adapter it runs with (None: the base model)


# Where an in-flight request sits in its backend's running totals.
PHASE_PREFILL = 0  # no first byte, before its expected first token: counted as queued prefill
PHASE_LATE = 1  # no first byte, past it (a non-streamed answer): decode tokens only
PHASE_DECODE = 2  # first byte seen, decode expected to be running
PHASE_DONE = 3  # first byte seen, decode expected to be over (or it ended)


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
    # Our requests with no first byte at some moment between the scrape's send and its answer: the
    # part of `waiting` we know about. Snapshotted then, so a request that ends later is still ours.
    ours_waiting: int = 0
    # Our requests in flight at some moment in that window: the part of running + waiting we know about.
    ours_total: int = 0
    # vllm:lora_requests_info's newest sample: adapter slots and the adapters running or waiting.
    max_loras: int | None = None
    active_loras: frozenset[str] = frozenset()

    def free_lora_slots(self) -> int | None:
        """Adapter slots no running or waiting adapter holds (None: the backend does not say)."""
        return None if self.max_loras is None else max(0, self.max_loras - len(self.active_loras))


@dataclass(eq=False)
class Backend:
    """A backend URL plus everything routing needs to know about it."""

    url: str
    healthy: bool = True
    failures: int = 0
    last_error: str | None = None
    models: list[str] | None = None
    adapters: dict = field(default_factory=dict)  # LoRA adapter name -> AdapterCard (routing/adapters.py)
    api_key: str | None = field(default=None, repr=False)  # sent upstream; never in logs or reprs
    runtime_lora: bool | None = None  # /v1/load_lora_adapter: None = not tried, False = refused (routing/adapters.py)
    auth_error: str | None = None  # set while the backend rejects our credentials
    max_model_len: int | None = None
    scraped: ScrapedLoad = field(default_factory=ScrapedLoad)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    processed: int = 0
    requests: dict[int, InFlight] = field(default_factory=dict)

    # Running totals, updated on route (`add`), first byte (`started`) and end (`remove`); what a
    # routing decision reads is O(1) amortised however many requests are in flight (issue #14).
    # Time-dependent parts (a prefill past its expected first token, a decode past its expected
    # end) leave the totals through heaps, each entry popped once.
    n_unstarted: int = 0
    left_unstarted: int = 0  # requests that ever left `n_unstarted` (first byte or end): see `scrape_mark`
    ended: int = 0  # requests that ever left `requests`: see `scrape_mark`
    pending_s: float = 0.0
    n_pending: int = 0
    unstarted_tokens: float = 0.0
    n_decoding: int = 0
    decode_end_sum: float = 0.0
    held_blocks: float = 0.0
    loras: dict[str, int] = field(default_factory=dict)  # adapter -> our in-flight requests with it
    _pending_heap: list = field(default_factory=list, repr=False)
    _decode_heap: list = field(default_factory=list, repr=False)

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What every request to this backend carries: its API key (vLLM --api-key guards /v1/*)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    # -- running totals -------------------------------------------------------------------------
    def add(self, r: InFlight) -> None:
        """`r` was routed here: queued prefill, decode tokens to come, blocks it will pin."""
        self.requests[r.id] = r
        if r.lora is not None:
            self.loras[r.lora] = self.loras.get(r.lora, 0) + 1
        self.n_unstarted += 1
        self.unstarted_tokens += r.max_tokens
        self.held_blocks += r.held_blocks
        if r.routed_at < r.expected_first_token:
            r.phase = PHASE_PREFILL
            self.pending_s += r.prefill_s
            self.n_pending += 1
            heapq.heappush(self._pending_heap, (r.expected_first_token, r.id, r))
        else:
            r.phase = PHASE_LATE

    def started(self, r: InFlight, t: float) -> None:
        """`r`'s first byte arrived at `t`: its prefill is done, its decode runs until about decode_end."""
        if r.first_byte_at is not None or r.id not in self.requests:
            return
        r.first_byte_at = t
        self._leave_unstarted(r)
        r.decode_end = t + r.decode_wall
        if r.decode_end > t:
            r.phase = PHASE_DECODE
            self.n_decoding += 1
            self.decode_end_sum += r.decode_end
            heapq.heappush(self._decode_heap, (r.decode_end, r.id, r))
        else:
            r.phase = PHASE_DONE

    def remove(self, r: InFlight) -> None:
        if self.requests.pop(r.id, None) is None:
            return
        self.ended += 1
        if r.lora is not None:
            n = self.loras[r.lora] - 1
            if n:
                self.loras[r.lora] = n
            else:
                del self.loras[r.lora]
        if r.first_byte_at is None:
            self._leave_unstarted(r)
        elif r.phase == PHASE_DECODE:
            self.n_decoding -= 1
            self.decode_end_sum -= r.decode_end
        r.phase = PHASE_DONE
        self.held_blocks -= r.held_blocks
        if not self.requests:  # exact zeros: no float drift survives an idle moment
            self.pending_s = self.unstarted_tokens = self.decode_end_sum = self.held_blocks = 0.0
            self.loras.clear()
            self.n_pending = self.n_decoding = self.n_unstarted = 0
            self._pending_heap.clear()
            self._decode_heap.clear()

    def _leave_unstarted(self, r: InFlight) -> None:
        self.n_unstarted -= 1
        self.left_unstarted += 1
        self.unstarted_tokens -= r.max_tokens
        if r.phase == PHASE_PREFILL:
            self.pending_s -= r.prefill_s
            self.n_pending -= 1
        r.phase = PHASE_LATE

    def _advance(self, now: float) -> None:
        """Retire prefills past their expected first token and decodes past their expected end."""
        h = self._pending_heap
        while h and h[0][0] <= now:
            _, _, r = heapq.heappop(h)
            if r.phase == PHASE_PREFILL:
                r.phase = PHASE_LATE
                self.pending_s -= r.prefill_s
                self.n_pending -= 1
        h = self._decode_heap
        while h and h[0][0] <= now:
            _, _, r = heapq.heappop(h)
            if r.phase == PHASE_DECODE:
                r.phase = PHASE_DONE
                self.n_decoding -= 1
                self.decode_end_sum -= r.decode_end

    # -- load estimates (emulated seconds) -------------------------------------------------------
    def pending_prefill(self, now: float) -> tuple[float, int]:
        """Prefill seconds of in-flight requests not yet past their first token, and how many."""
        self._advance(now)
        return max(0.0, self.pending_s), self.n_pending

    def queue_state(self, now: float, decode_per_token: float, time_scale: float) -> tuple[float, int, float]:
        """(pending prefill seconds, requests still prefilling, decode tokens left across in-flight requests)."""
        self._advance(now)
        tokens = self.unstarted_tokens
        wall_per_token = decode_per_token * time_scale
        if self.n_decoding and wall_per_token > 0:
            tokens += max(0.0, (self.decode_end_sum - self.n_decoding * now) / wall_per_token)
        return max(0.0, self.pending_s), self.n_pending, tokens

    def soonest_end(self, now: float) -> float:
        """Wall seconds until the first decoding request is expected to end (0 when none decodes)."""
        self._advance(now)
        return self._decode_heap[0][0] - now if self.n_decoding and self._decode_heap else 0.0

    def lora_slot_wait(self, lora: str, now: float, max_loras: int | None) -> float:
        """Wall seconds until `lora` can run here: 0 when it runs already, a slot is free or the slots are
        unknown, else until every in-flight request of one of the adapters holding the slots has ended
        (vLLM schedules at most `max_loras` distinct adapters in a batch; the rest wait). Walks the
        in-flight requests, and only when the slots are full."""
        loras = self.loras
        if max_loras is None or lora in loras or len(loras) < max_loras:
            return 0.0
        last_end: dict[str, float] = {}  # adapter -> when its last in-flight request is expected to end
        for r in self.requests.values():
            if r.lora is None:
                continue
            if r.first_byte_at is not None:
                end = r.decode_end
            else:
                start = r.expected_first_token if r.expected_first_token != float("inf") else now
                end = max(now, start) + r.decode_wall
            if end > last_end.get(r.lora, -1.0):
                last_end[r.lora] = end
        return max(0.0, min(last_end.values()) - now)

    def scrape_mark(self) -> tuple[int, int]:
        """Taken as a /metrics scrape is sent, and handed back to `note_scrape` with its answer."""
        return self.left_unstarted, self.ended

    def note_scrape(self, running: float | None, waiting: float | None, kv_usage: float | None, at: float,
                    since: tuple[int, int] | None = None) -> None:
        """A /metrics scrape came back at `at`; snapshot which of its waiting requests may be ours.

        The backend counted its waiting requests at some moment between the scrape's send (`since`,
        from `scrape_mark`) and now: ours are those with no first byte now plus those that left that
        state in between. Counting only the first charged a request that finished while the answer
        was on its way as someone else's queue (a real-vLLM salt test sent a prompt off its home)."""
        s = self.scraped
        s.running, s.waiting, s.kv_usage, s.at = running, waiting, kv_usage, at
        s.ours_waiting = self.n_unstarted + (self.left_unstarted - since[0] if since is not None else 0)
        s.ours_total = len(self.requests) + (self.ended - since[1] if since is not None else 0)

    def unseen_load(self) -> tuple[float, float]:
        """(waiting, running) requests the last scrape counted that are not ours: another router's, or
        clients' that reach the backend directly. Ours are counted generously (every request in flight
        at some moment between the scrape's send and answer), so a request of ours is never taken for
        someone else's; what is left is at least that many others'."""
        s = self.scraped
        waiting = s.waiting or 0.0
        unseen_waiting = max(0.0, waiting - s.ours_waiting)
        if s.running is None:
            return unseen_waiting, 0.0
        unseen = s.running + waiting - s.ours_total
        return unseen_waiting, max(0.0, unseen - unseen_waiting)

    def queue_state_scan(self, now: float, decode_per_token: float, time_scale: float) -> tuple[float, int, float]:
        """`queue_state` by walking every in-flight request: the reference the running totals are tested against."""
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
    return clock.monotonic()
