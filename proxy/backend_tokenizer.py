"""Token ids from a backend's own `POST /tokenize` (`--tokenizer backend`).

With a real model the proxy's built-in tokenizer does not produce the backend's token ids, so its
block hashes would never match. Asking the backend gives the exact ids (for chat, through the
backend's own chat template); answers are cached per text so repeated prompts cost no round trip.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from kvblocks import APIError

from .backends import Backend

CACHE_ENTRIES = 4096


class BackendTokenizer:
    """Encodes through `/tokenize` of whichever healthy backend the caller names; LRU-cached by input."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 5.0, max_entries: int = CACHE_ENTRIES) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_entries = max_entries
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
                                         headers={"Content-Type": "application/json", **backend.auth_headers}) as r:
                payload = await r.read()
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
        self._cache[key] = tokens
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return tokens
