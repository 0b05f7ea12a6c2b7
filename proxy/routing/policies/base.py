"""The one interface every routing policy implements, and what a policy may look at.

A policy sees the request (its block hashes, with the prefix matches per backend computed once,
on demand) and the healthy candidate backends, and returns a `Decision`. Policies are plain
classes so unit tests can drive them without HTTP.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvblocks.latency import LatencyProfile

from ...backends.registry import Backend
from ...index.prefix_index import PrefixIndex


@dataclass
class RoutingEnv:
    """Shared state policies read: the prefix index, the backends' latency model and clock scale."""

    index: PrefixIndex
    profile: LatencyProfile
    block_size: int = 16
    time_scale: float = 1.0
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class RequestContext:
    """One request as routing sees it: token count, chained block hashes (int form), output budget.

    A lazy context (`tail` set) knows its hashes only as far as any backend matched it and estimates
    `num_tokens`; the matches are exact all the same. `full_hashes()` finishes it when a policy needs all.
    """

    hashes: Sequence[int]
    num_tokens: int
    max_tokens: int = 16
    model: str | None = None
    index: PrefixIndex | None = None
    _matches: dict | None = field(default=None, repr=False)
    tail: Any = field(default=None, repr=False)  # the router's untokenized rest of the prompt
    completer: Callable[[RequestContext], None] | None = field(default=None, repr=False)
    # Routed by a policy that does not read the prompt: nothing was tokenized or looked up, so no
    # matched-block count is claimed (no x-kvroute-matched-blocks header, no kvroute_matched_blocks sample).
    blind: bool = False
    session: str | None = None  # the client's session key (routing/session.py)
    lora: str | None = None  # the LoRA adapter the request runs on (routing/adapters.py), None for a base model
    session_home: Backend | None = field(default=None, repr=False)  # set by the router before `pick`
    # Tokens per block of `hashes`: the block size of the model's backends (0: the fleet's, env.block_size).
    block_size: int = 0

    @property
    def complete(self) -> bool:
        """Whether every block of the prompt is hashed (`hashes` final, `num_tokens` exact)."""
        return self.tail is None

    def num_blocks(self, block_size: int) -> int:
        """Full blocks of the prompt (estimated while lazy)."""
        return len(self.hashes) if self.tail is None else max(len(self.hashes), self.num_tokens // block_size)

    def full_hashes(self) -> Sequence[int]:
        """All the prompt's block hashes, tokenizing the rest of a lazy prompt first (then `complete`)."""
        if self.tail is not None and self.completer is not None:
            self.completer(self)
        return self.hashes

    @property
    def matches(self) -> dict:
        """Backend URL -> leading blocks it holds (computed once per request)."""
        if self._matches is None:
            self._matches = self.index.match(self.hashes) if self.index is not None else {}
        return self._matches

    def matched(self, backend: Backend) -> int:
        """Leading blocks of this prompt `backend` holds (0 if none)."""
        return self.matches.get(backend.url, 0)


@dataclass
class Decision:
    """A policy's answer: the backend, how many leading blocks of the prompt it holds, and why (logged)."""

    backend: Backend
    matched_blocks: int
    reason: str = ""


class Policy:
    """Base class: subclasses set `name` and implement `pick`; `observe`/`reset` are optional hooks."""

    name: ClassVar[str] = ""
    # False for policies that never look at the prompt's blocks (round_robin, random, least_loaded):
    # the proxy then skips tokenizing and hashing it, and the prefix index does not learn from their routes.
    reads_prompt: ClassVar[bool] = True

    def __init__(self, env: RoutingEnv) -> None:
        self.env = env

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """Choose one of `candidates` (non-empty: healthy, serving the model, breaker closed) for `ctx`.

        Must not change routing state: the router records the pick (`observe`) only once it sends the
        request. May call `ctx.full_hashes()` if it needs the whole prompt (a lazy one is then tokenized)."""
        raise NotImplementedError

    def observe(self, ctx: RequestContext, backend: Backend) -> None:
        """Called after any policy routed `ctx` to `backend` (policies with private state update it)."""

    def reset(self) -> None:
        """Forget private routing state (admin reset)."""

    def forget_backend(self, url: str) -> None:
        """A backend was removed."""


def least_loaded(candidates: Sequence[Backend], start: int = 0) -> Backend:
    """Fewest in-flight requests; ties go to the first at or after `start` (rotation avoids a favourite)."""
    n = len(candidates)
    best = None
    best_load = 1 << 62
    for k in range(n):
        b = candidates[(start + k) % n]
        load = len(b.requests)
        if load < best_load:
            best, best_load = b, load
    return best
