"""Token ids from a backend's own `POST /tokenize` (`--tokenizer backend`).

With a real model the proxy's built-in tokenizer does not produce the backend's token ids, so its
block hashes would never match. Asking the backend gives the exact ids (for chat, through the
backend's own chat template); answers are cached per text so repeated prompts cost no round trip,
in a cache bounded in entries and in bytes.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from kvblocks import APIError

from ..backends.registry import Backend

CACHE_ENTRIES = 4096
# The cache's byte budget, as estimated by `_entry_bytes` (a prompt can be megabytes: entries alone do not bound it).
CACHE_BYTES = 64 * 1024 * 1024
# A /tokenize answer for any prompt the proxy accepts is far smaller than this.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


def _entry_bytes(key: bytes, tokens: list[int]) -> int:
    """About what an entry holds: the key, a list slot and an int object per token, and overhead."""
    return len(key) + 40 * len(tokens) + 200


class BackendTokenizer:
    """Encodes through `/tokenize` of whichever healthy backend the caller names; LRU-cached by input."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout: float = 5.0, max_entries: int = CACHE_ENTRIES,
        max_bytes: int = CACHE_BYTES,
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # invariant: the sum of _entry_bytes over the cache, <= max_bytes
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def encode(
        self, backend: Backend, model: str | None, text: str | None = None, messages: list[Any] | None = None
    ) -> list[int]:
        """Token ids of a prompt (`text`) or a conversation (`messages`) as that backend tokenizes them."""
        body: dict[str, Any] = {"model": model} if model else {}
        if messages is not None:
            body["messages"] = messages
            body["add_generation_prompt"] = True
        else:
            body["prompt"] = text
        key = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return ids
        self.misses += 1
        try:
            async with self.session.post(backend.url + "/tokenize", data=key, timeout=self.timeout,
                                         headers={"Content-Type": "application/json", **backend.auth_headers},
                                         allow_redirects=False) as r:
                payload = await r.content.read(MAX_ANSWER_BYTES + 1)  # bounded: a backend's answer is input too
                if len(payload) > MAX_ANSWER_BYTES:
                    raise APIError(503, f"tokenization failed: a backend's /tokenize answer exceeds {MAX_ANSWER_BYTES} bytes")
                if r.status >= 500:
                    raise APIError(503, f"tokenization failed at a backend (HTTP {r.status})")
                data = orjson.loads(payload)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError):
            raise APIError(503, "tokenization failed: no backend answered /tokenize") from None
        if r.status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            raise APIError(r.status, message or f"the backend rejected the prompt (HTTP {r.status})",
                           err.get("param") if isinstance(err, dict) else None)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list):
            raise APIError(503, "tokenization failed: the backend's /tokenize answer has no token list")
        size = _entry_bytes(key, tokens)
        if size <= self.max_bytes // 4:  # one huge prompt does not flush the cache
            old = self._cache.pop(key, None)  # two concurrent misses of one prompt
            if old is not None:
                self.bytes -= _entry_bytes(key, old)
            self._cache[key] = tokens
            self.bytes += size
            while len(self._cache) > self.max_entries or self.bytes > self.max_bytes:
                k, v = self._cache.popitem(last=False)
                self.bytes -= _entry_bytes(k, v)
        return tokens
