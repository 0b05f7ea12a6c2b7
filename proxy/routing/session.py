"""Session keys: a client says "these requests are one session" and routing keeps them together softly.

The key comes from a request header (`--session-header`, default `x-session-id`) or, with
`--session-user-field`, from the OpenAI `user` field. A session's home is the backend that served
its last request; a new session's first home is the rendezvous-hash winner of its key among the
candidates, so proxy replicas place it alike without talking. The policy (kv_aware) then keeps the
request home unless home costs more than its `session_valve_s` over the cheapest backend, the same
reasoning as a chat turn staying with its history: affinity is soft, an overloaded home is left,
and the session's home moves with it. The table is bounded (least recently used sessions go).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from .policies import rendezvous

MAX_SESSIONS = 65536
MAX_SESSION_KEY = 256


def session_key(headers: Mapping[str, str], header: str, user: Any = None, use_user: bool = False) -> str | None:
    """The request's session key: the header's value, else (when enabled) the `user` field; None for none.
    Over-long keys are cut (a key only names a session; the table's memory stays bounded)."""
    key = headers.get(header) if header else None
    if not key and use_user and isinstance(user, str):
        key = user
    if not key:
        return None
    return key[:MAX_SESSION_KEY]


def key_hash(key: str) -> int:
    """A process-independent 64-bit hash of a session key (replicas must agree)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class SessionAffinity:
    """Session key -> the backend URL that served it last, least recently used first."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def home(self, key: str, candidates: Sequence[Any]) -> Any | None:
        """The session's home among `candidates`: where it ran last, else its rendezvous winner."""
        if not candidates:
            return None
        last = self._last.get(key)
        if last is not None:
            for b in candidates:
                if b.url == last:
                    return b
        h = key_hash(key)
        return max(candidates, key=lambda b: rendezvous.weight(h, b.url))

    def record(self, key: str, url: str) -> None:
        last = self._last
        last.pop(key, None)
        last[key] = url
        if len(last) > self.max_sessions:
            del last[next(iter(last))]

    def forget_backend(self, url: str) -> None:
        for k in [k for k, u in self._last.items() if u == url]:
            del self._last[k]

    def reset(self) -> None:
        self._last.clear()
