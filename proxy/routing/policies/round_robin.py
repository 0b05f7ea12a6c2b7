"""Each request to the next healthy backend in turn: the cache-blind baseline."""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend
from .base import Decision, Policy, RequestContext


class RoundRobinPolicy(Policy):
    """Each request to the next candidate in turn; a baseline."""

    name = "round_robin"
    reads_prompt = False

    def __init__(self, env) -> None:
        super().__init__(env)
        self._next = 0

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """The next candidate in turn (the turn counts requests, not backends)."""
        b = candidates[self._next % len(candidates)]
        self._next += 1
        return Decision(b, ctx.matched(b), "turn")

    def reset(self) -> None:
        """Start the turn again from the first candidate."""
        self._next = 0
