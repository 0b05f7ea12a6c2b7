"""A uniformly random healthy backend (seeded through the routing env for reproducible runs)."""
from __future__ import annotations

from collections.abc import Sequence

from ...backends.registry import Backend
from .base import Decision, Policy, RequestContext


class RandomPolicy(Policy):
    """Uniformly random (seeded by the routing env's rng); a baseline."""

    name = "random"
    reads_prompt = False

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """A uniformly random candidate."""
        b = candidates[self.env.rng.randrange(len(candidates))]
        return Decision(b, ctx.matched(b), "random")
