"""Fewest in-flight requests (counted from routing), ties rotated: LiteLLM's least-busy."""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend
from .base import Decision, Policy, RequestContext, least_loaded


class LeastLoadedPolicy(Policy):
    """Fewest requests in flight; ties rotate. Ignores the cache (a baseline)."""

    name = "least_loaded"
    reads_prompt = False

    def __init__(self, env) -> None:
        super().__init__(env)
        self._turn = 0

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """The candidate with the fewest in-flight requests, ties to the next in turn."""
        self._turn += 1
        b = least_loaded(candidates, self._turn)
        return Decision(b, ctx.matched(b), f"in_flight={b.in_flight}")
