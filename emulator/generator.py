"""Deterministic dummy token generator: the same prompt and seed always give the same tokens.

Tokens are real ordinary tokens of the tokenizer (" word" pieces), so the output decodes to clean
text and re-tokenizes to the same ids. EOS may occur by a seeded chance per token when allowed.
"""
from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Sequence
from functools import lru_cache

from kvblocks import Tokenizer


@lru_cache(maxsize=4)
def word_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids of ordinary tokens that are a space plus a lowercase ASCII word (decodable one by one)."""
    enc = getattr(tokenizer, "_enc", None)
    limit = getattr(tokenizer, "ordinary_vocab_size", tokenizer.vocab_size)
    out = []
    for i in range(limit):
        try:
            b = enc.decode_single_token_bytes(i) if enc is not None else tokenizer.decode([i]).encode()
        except (KeyError, ValueError):
            continue
        w = b[1:]
        if len(b) >= 3 and b[:1] == b" " and w.isascii() and w.isalpha() and w.islower():
            out.append(i)
    if not out:
        out = [i for i in range(min(limit, 1000)) if i != tokenizer.eos_token_id]
    return tuple(out)


class SequenceGenerator:
    """The token stream of one request; its RNG state is the only state, so preemption is harmless."""

    __slots__ = ("_rng", "_words", "_eos", "_eos_p")

    def __init__(self, rng: random.Random, words: tuple[int, ...], eos_token_id: int, eos_probability: float) -> None:
        self._rng = rng
        self._words = words
        self._eos = eos_token_id
        self._eos_p = eos_probability

    def next_token(self, allow_eos: bool) -> int:
        r = self._rng
        if self._eos_p > 0 and r.random() < self._eos_p and allow_eos:
            return self._eos
        return self._words[r.randrange(len(self._words))]


class TokenGenerator:
    """Makes a `SequenceGenerator` per request, keyed by (server seed, request seed, prompt tokens)."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, eos_probability: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.eos_probability = eos_probability
        self.words = word_token_ids(tokenizer)

    def for_prompt(self, prompt_token_ids: Sequence[int], request_seed: int | None = None) -> SequenceGenerator:
        h = hashlib.sha256(f"{self.seed}:{request_seed}:".encode())
        h.update(array("q", prompt_token_ids).tobytes())
        rng = random.Random(h.digest())
        return SequenceGenerator(rng, self.words, self.tokenizer.eos_token_id, self.eos_probability)

    def length_rng(self, prompt_token_ids: Sequence[int], request_seed: int | None = None) -> random.Random:
        """The RNG a request's natural output length is drawn from: same key as its tokens, another stream."""
        h = hashlib.sha256(f"length:{self.seed}:{request_seed}:".encode())
        h.update(array("q", prompt_token_ids).tobytes())
        return random.Random(h.digest())

    def token_text(self, token_id: int) -> str:
        """Text of one generated token; special tokens (EOS) add no text, as with skip_special_tokens."""
        if token_id == self.tokenizer.eos_token_id:
            return ""
        dec = getattr(self.tokenizer, "decode_token", None)
        return dec(token_id) if dec is not None else self.tokenizer.decode([token_id])
