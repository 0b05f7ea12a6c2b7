"""No silent zero overlap: check a backend's exact (event-fed) view against what the backend reports.

An exact index can be quietly wrong: a miswired event socket (vLLM started with its endpoint on
`tcp://127.0.0.1:P` connects instead of binding, so nothing ever arrives while the replay socket
answers "nothing buffered"), a different hash seed, block size or tokenizer. It then matches
nothing and routes every repeat of a cached prompt blind. Two checks catch it, per backend:

- Responses: each answer's `usage.prompt_tokens_details.cached_tokens` is compared with what the
  exact view holds of the prompt's leading blocks. The backend reporting at least a block more than
  the view holds is a miss; `miss_limit` misses in a row (any agreeing answer resets the count)
  make the view untrusted.
- Counters: vLLM's prefix-cache counters say how many prompt tokens it computed. When it computed
  at least `silent_blocks` full blocks beyond what request tails explain (every request may leave
  a partial block and recompute its last one) and not one event batch arrived meanwhile, the
  view is untrusted too.

Untrusted, the backend is routed on the approximate index (the follower's `distrust`), which is
said once in the log, in /admin/backends and in `kvroute_exact_view_untrusted`. Checking goes on:
`agree_limit` answers in a row that the exact view predicted right, or event batches arriving
after a counter verdict, restore it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kvroute.proxy.kv_events")

MISSES = "cached_tokens_missed"
NO_EVENTS = "no_events_while_computing"
AUDIT_REASONS = (MISSES, NO_EVENTS)


@dataclass
class AuditState:
    """One backend's checks; `reason` is set while its exact view is untrusted."""

    misses_in_row: int = 0
    agrees_in_row: int = 0
    checked: int = 0
    missed: int = 0
    reason: str | None = None
    detail: str | None = None
    untrusted_total: int = 0
    # Counters at the last time event batches were seen to arrive (or first scraped).
    batches: int | None = None
    computed: float = 0.0
    requests: float = 0.0


class ExactViewAudit:
    """Compares the exact view of each event-fed backend with its answers and counters."""

    miss_limit = 4
    agree_limit = 4
    silent_blocks = 2

    def __init__(self, follower: Any) -> None:
        self.follower = follower
        self.states: dict[str, AuditState] = {}

    def state(self, backend: str) -> AuditState:
        st = self.states.get(backend)
        if st is None:
            st = self.states[backend] = AuditState()
        return st

    def forget(self, backend: str) -> None:
        self.states.pop(backend, None)

    # ---- answers ----------------------------------------------------------------------------------
    def predict(self, backend: str, hashes: Sequence[int]) -> int | None:
        """Taken when the request is routed (before it counts as held there): the leading blocks the
        exact view says `backend` holds; None when the backend is not followed."""
        f = self.follower
        return f.exact_prefix(backend, hashes) if f.followed(backend) else None

    def observe_answer(self, backend: str, held: int, known_blocks: int, complete: bool, num_tokens: int,
                       cached_tokens: int, block_size: int) -> None:
        """One answer's cached_tokens against `held`, the exact view's prediction (`predict`) of its
        prompt's leading blocks, `known_blocks` of which routing had hashed."""
        f = self.follower
        if not f.followed(backend) or not f.in_sync(backend) or block_size < 1:
            return
        if held == known_blocks and not complete:
            return  # the view holds every block routing hashed; how much further is unknown: no verdict
        predicted = block_size * min(held, max(0, (num_tokens - 1) // block_size))
        st = self.state(backend)
        st.checked += 1
        if cached_tokens >= predicted + block_size:
            st.missed += 1
            st.misses_in_row += 1
            st.agrees_in_row = 0
            if st.reason is None and st.misses_in_row >= self.miss_limit:
                self._untrust(backend, st, MISSES,
                              f"{st.misses_in_row} answers in a row reported more cached tokens than the KV events "
                              f"showed (last: {cached_tokens} cached, {predicted} predicted)")
        else:
            st.misses_in_row = 0
            if cached_tokens > 0 or predicted > 0:
                st.agrees_in_row += 1
                if st.reason == MISSES and st.agrees_in_row >= self.agree_limit:
                    self._trust(backend, st, f"{st.agrees_in_row} answers in a row matched the KV events' view")

    # ---- counters ---------------------------------------------------------------------------------
    def observe_counters(self, backend: str, queries: float, hits: float, requests: float, block_size: int,
                         unfinished: float = 0.0) -> None:
        """A /metrics scrape's prefix-cache counters (tokens), finished requests and running + waiting ones,
        against event arrivals."""
        f = self.follower
        if not f.followed(backend) or not f.in_sync(backend) or block_size < 1:
            return
        st = self.state(backend)
        batches = f.batches_applied(backend)
        computed = queries - hits
        if st.batches is None or batches != st.batches or computed < st.computed or requests < st.requests:
            if st.reason == NO_EVENTS and st.batches is not None and batches != st.batches:
                self._trust(backend, st, "KV event batches arrive again")
            st.batches, st.computed, st.requests = batches, computed, requests  # events flow (or counters reset)
            return
        # Each request may compute a partial last block and recompute its last full one without a new event.
        unexplained = (computed - st.computed) - 2 * block_size * (requests - st.requests + unfinished)
        if st.reason is None and unexplained >= self.silent_blocks * block_size:
            self._untrust(backend, st, NO_EVENTS,
                          f"the backend computed {int(computed - st.computed)} prompt tokens over "
                          f"{int(requests - st.requests)} requests with no KV event arriving (a miswired event "
                          "endpoint? vLLM connects instead of binding unless the address has *)")

    # ---- transitions ------------------------------------------------------------------------------
    def _untrust(self, backend: str, st: AuditState, reason: str, detail: str) -> None:
        st.reason, st.detail = reason, detail
        st.untrusted_total += 1
        st.agrees_in_row = 0
        log.warning("kv events %s: exact view untrusted, routing on the approximate index: %s", backend, detail)
        self.follower.distrust(backend)

    def _trust(self, backend: str, st: AuditState, why: str) -> None:
        log.info("kv events %s: exact view trusted again (%s)", backend, why)
        st.reason = st.detail = None
        st.misses_in_row = st.agrees_in_row = 0
        self.follower.trust(backend)

    def describe(self, backend: str) -> dict[str, Any] | None:
        st = self.states.get(backend)
        if st is None:
            return None
        return {"untrusted": st.reason, "why": st.detail, "answers_checked": st.checked, "answers_missed": st.missed}


MAX_DIGITS = 12  # no count has more digits; more is a broken backend, ignored (never raises into the relay)


def usage_int(data: bytes, key: bytes) -> int | None:
    """The integer after `"key":` in a JSON body or SSE chunk (last occurrence), without parsing it all;
    None when absent or not a sane count."""
    i = data.rfind(b'"' + key + b'":')
    if i < 0:
        return None
    j = i + len(key) + 3
    while j < len(data) and data[j] == 0x20:
        j += 1
    k = j
    stop = min(len(data), j + MAX_DIGITS + 1)
    while k < stop and 0x30 <= data[k] <= 0x39:
        k += 1
    return int(data[j:k]) if j < k <= j + MAX_DIGITS else None
