"""Seeded prompt text whose token count under cl100k_base is exact.

Every word is one cl100k token of the form " word" (a space and 3-10 lowercase letters). The
tokenizer's pre-split rule makes each such word its own piece, so a text of n words encodes to
exactly those n token ids, and concatenating texts concatenates their token ids: shared prefixes
of text are shared prefixes of tokens, hence of 16-token KV blocks.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

from kvblocks import get_tokenizer

_WORD = re.compile(r" [a-z]{3,10}")


@lru_cache(maxsize=1)
def word_token_ids() -> tuple[int, ...]:
    """Ids of the single-token words, in id order (fixed by the tokenizer, so seeds are stable)."""
    tok = get_tokenizer()
    ids = []
    for i in range(tok.ordinary_vocab_size):
        try:
            piece = tok.decode_token(i)
        except KeyError:
            continue
        if _WORD.fullmatch(piece):
            ids.append(i)
    return tuple(ids)


def token_ids(rng: random.Random, n: int) -> list[int]:
    """n seeded word-token ids: the draws of `rng.randrange(len(vocab))`, inlined (a trace's prompts
    draw millions; the same getrandbits rejection loop CPython's randrange runs, so the same texts)."""
    vocab = word_token_ids()
    m = len(vocab)
    k = m.bit_length()
    draw = rng.getrandbits
    out = []
    add = out.append
    for _ in range(n):
        r = draw(k)
        while r >= m:
            r = draw(k)
        add(vocab[r])
    return out


def words(rng: random.Random, n: int) -> str:
    """A text of exactly n tokens drawn from `rng`."""
    if n <= 0:
        return ""
    return get_tokenizer().decode(token_ids(rng, n))


def seeded_words(n: int, *key: object) -> str:
    """Text of n tokens that depends only on `key` (e.g. (seed, "doc", 3)): reproducible anywhere."""
    return words(random.Random(repr(key)), n)


def count_tokens(text: str) -> int:
    return len(get_tokenizer().encode(text))
