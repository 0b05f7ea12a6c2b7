"""Tokenizing long prompts piecewise with a cache, exact for cl100k_base (RAG docs, chat history).

cl100k's pre-tokenizer never lets a piece span the point just before a single space that follows a
non-space character and precedes a letter (the space starts the next word's piece, and nothing to
the left looks ahead past it), and BPE never merges across pieces. So cutting the text at such
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
MAX_ENTRIES = 16384
SAFE_TOKENIZERS = ("cl100k_base",)


class ChunkedTokenizer:
    def __init__(self, tokenizer: Tokenizer, chunk_chars: int = CHUNK_CHARS, max_entries: int = MAX_ENTRIES) -> None:
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        self.max_entries = max_entries
        self.enabled = getattr(tokenizer, "name", None) in SAFE_TOKENIZERS
        self._cache: OrderedDict[tuple[int, str], tuple[int, list[int]]] = OrderedDict()  # (prefix id, chunk) -> (id, ids)
        self._ids = itertools.count(1)
        self.hits = 0
        self.misses = 0

    def cut_points(self, text: str) -> list[int]:
        """Offsets where the text can be split without changing its tokenization."""
        cuts = []
        n = len(text)
        step = self.chunk_chars
        pos = step
        while pos < n - step // 4:
            p = text.find(" ", pos)
            while p != -1 and p + 1 < n and not (not text[p - 1].isspace() and text[p + 1].isalpha()):
                p = text.find(" ", p + 1)
            if p == -1 or p + 1 >= n:
                break
            cuts.append(p)
            pos = p + step
        return cuts

    def encode(self, text: str) -> list[int]:
        return self.encode_with_prefixes(text)[0]

    def encode_with_prefixes(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, prefixes): for each cut, (tokens before it, an id naming the text before it).

        Equal ids mean equal text prefixes (ids are never reused), so callers can cache work derived
        from a prefix's tokens (its block hashes) under the id.
        """
        enc = self.tokenizer.encode
        if not self.enabled or len(text) < 2 * self.chunk_chars:
            return enc(text), []
        cache = self._cache
        out: list[int] = []
        prefixes: list[tuple[int, int]] = []
        chain = 0
        start = 0
        # The last chunk (where prompts usually diverge) is encoded without caching.
        for cut in self.cut_points(text):
            key = (chain, text[start:cut])
            hit = cache.get(key)
            if hit is None:
                self.misses += 1
                hit = cache[key] = (next(self._ids), enc(key[1]))
                if len(cache) > self.max_entries:
                    cache.popitem(last=False)
            else:
                self.hits += 1
                cache.move_to_end(key)
            chain, ids = hit
            out += ids
            prefixes.append((len(out), chain))
            start = cut
        out += enc(text[start:])
        return out, prefixes
