"""Tokenizing long prompts piecewise with a cache, exact for cl100k_base (RAG docs, chat history).

cl100k's pre-tokenizer never lets a piece span the point just before a space that follows a
non-space character (the space starts the next piece, and nothing to the left looks ahead past
it), and BPE never merges across pieces. So cutting the text at such
points and encoding the chunks separately gives exactly the ids of encoding the whole text. Cut
points are searched forward from fixed offsets, so two prompts sharing a long prefix cut it the
same way and the shared chunks are encoded once. Chunks are cached per preceding prefix, which
gives every cached prefix an id the router keys its reusable block hashes on.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from kvblocks import Tokenizer

CHUNK_CHARS = 1024
# The first chunk is small (lazy routing often needs no more) and each next one doubles up to CHUNK_CHARS.
FIRST_CHUNK_CHARS = 128
MAX_ENTRIES = 16384
SAFE_TOKENIZERS = ("cl100k_base",)


class ChunkedTokenizer:
    """A tokenizer's exact ids, encoded in cached chunks (at most `max_entries`, LRU); a tokenizer not in
    SAFE_TOKENIZERS is passed through whole (`enabled` False)."""

    def __init__(
        self, tokenizer: Tokenizer, chunk_chars: int = CHUNK_CHARS, max_entries: int = MAX_ENTRIES,
        first_chunk_chars: int = FIRST_CHUNK_CHARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        self.first_chunk_chars = min(first_chunk_chars, chunk_chars)
        self.max_entries = max_entries
        self.enabled = getattr(tokenizer, "name", None) in SAFE_TOKENIZERS
        self._cache: OrderedDict[tuple[int, str], tuple[int, list[int]]] = OrderedDict()  # (prefix id, chunk) -> (id, ids)
        self._ids = itertools.count(1)
        self.hits = 0
        self.misses = 0

    def step(self, k: int) -> int:
        """Size of chunk number `k` (0-based)."""
        return min(self.chunk_chars, self.first_chunk_chars << k)

    def cut_after(self, text: str, pos: int, step: int) -> int:
        """The first safe cut in [pos + step, pos + 2 x step), or -1 when there is none (the rest is
        then encoded whole). Safe: just before a space that follows a non-space character (no piece
        spans it, and the pieces after it match from there alike); one that precedes a letter is
        preferred, as it is where prompts sharing a prefix cut alike. The window bounds the scan and
        the chunk (a text with no safe cut near the step, e.g. `1 1 1 ...`, is no longer scanned to its end)."""
        n = len(text)
        p = pos + step
        if p >= n - step // 4:
            return -1
        end = min(n - 1, p + step)
        q = text.find(" ", p, end)
        fallback = -1
        while q != -1:
            if not text[q - 1].isspace():
                if text[q + 1].isalpha():
                    return q
                if fallback < 0:
                    fallback = q
            q = text.find(" ", q + 1, end)
        return fallback

    def next_chunk(self, text: str, pos: int, chain: int, k: int) -> tuple[list[int], int, int | None]:
        """Encode chunk number `k`, from `pos` (whose prefix has cache id `chain`): (ids, end, prefix id).

        The prefix id names text[:end] (None for the last chunk, which is where prompts usually
        diverge and is encoded without caching). Equal ids mean equal text prefixes (ids are never
        reused), so callers can cache work derived from a prefix's tokens (its block hashes) under it.
        """
        enc = self.tokenizer.encode
        if not self.enabled:  # one piece, with the tokenizer's own special tokens (a Llama BOS) as vLLM adds them
            return self.tokenizer.encode_prompt(text[pos:] if pos else text), len(text), None
        cut = self.cut_after(text, pos, self.step(k))
        if cut == -1:
            return enc(text[pos:] if pos else text), len(text), None
        cache = self._cache
        key = (chain, text[pos:cut])
        hit = cache.get(key)
        if hit is None:
            self.misses += 1
            hit = cache[key] = (next(self._ids), enc(key[1]))
            if len(cache) > self.max_entries:
                cache.popitem(last=False)
        else:
            self.hits += 1
            cache.move_to_end(key)
        return hit[1], cut, hit[0]

    def encode(self, text: str) -> list[int]:
        """Exactly `tokenizer.encode(text)`, chunk by chunk through the cache."""
        out: list[int] = []
        pos, chain, k = 0, 0, 0
        while pos < len(text):
            ids, pos, prefix_id = self.next_chunk(text, pos, chain, k)
            out += ids
            chain = prefix_id or 0
            k += 1
        return out
