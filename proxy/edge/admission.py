"""Admission of client requests: how many are in flight in the proxy, in total and per API key.

One client must not take every backend slot from the others, so an API key may hold at most
`max_per_key` requests at once (0 = unlimited); beyond that it gets a 429. Keys are tracked by a
digest, never stored or logged in the clear. The in-flight totals feed /metrics (leak checks).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from kvblocks import APIError


class TooManyConcurrent(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            429, f"too many concurrent requests for this API key (limit {limit}); retry when one has finished",
            type="RateLimitError",
        )


@lru_cache(maxsize=4096)
def key_id(token: str) -> str:
    """A stable, non-reversible name for an API key (the same key always maps to the same id)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class Admission:
    """Counts requests from the moment they are accepted until their answer has been sent."""

    def __init__(self, max_per_key: int = 0) -> None:
        self.max_per_key = max_per_key
        self.in_flight = 0
        self.per_key: dict[str, int] = {}
        self.rejected = 0

    @contextmanager
    def hold(self, token: str) -> Iterator[None]:
        """Count one request of `token` (its bearer token, "" if none) for the duration of the block."""
        kid = key_id(token)
        n = self.per_key.get(kid, 0)
        if self.max_per_key and n >= self.max_per_key:
            self.rejected += 1
            raise TooManyConcurrent(self.max_per_key)
        self.per_key[kid] = n + 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            left = self.per_key[kid] - 1
            if left:
                self.per_key[kid] = left
            else:
                del self.per_key[kid]
