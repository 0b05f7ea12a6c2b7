"""The piecewise cached tokenizer gives exactly the ids of encoding the whole text."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvblocks import get_tokenizer
from proxy.routing.tokenize_cache import ChunkedTokenizer

TOK = get_tokenizer()
ALPHABET = "ab cdé  Ω日本\n\n\r\t.,;:'!?-_0123456789\"()[]{}<|>$€ssttre'sll've"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list(ALPHABET) + [" the", " 's", "'re", " 123", "\n\n", "  ", " x"]), min_size=0, max_size=600))
def test_chunked_equals_whole(parts):
    text = "".join(parts)
    ct = ChunkedTokenizer(TOK, chunk_chars=16)
    assert ct.encode(text) == TOK.encode(text)
    assert ct.encode(text) == TOK.encode(text)  # again, from the cache


def test_shared_prefix_chunks_are_reused():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "Über", "naïve", "42", "x-ray", "(note)"]
    doc = " ".join(rng.choice(words) for _ in range(3000))
    ct = ChunkedTokenizer(TOK)
    for q in range(5):
        text = doc + f" question {q}: why?"
        assert ct.encode(text) == TOK.encode(text)
    assert ct.hits > 3 * ct.misses


def test_other_tokenizers_are_not_chunked():
    class Fake:
        name = "some/hf-tokenizer"

        def encode(self, text):
            return [len(text)]

        def encode_prompt(self, text):  # a BOS of 1, as a Llama tokenizer adds
            return [1, len(text)]

    ct = ChunkedTokenizer(Fake())
    assert ct.encode("a b " * 2000) == [1, 8000]


def test_router_text_context_reuses_prefix_hashes_exactly():
    from proxy.config import ProxyConfig
    from proxy.routing.router import Router

    r = Router(ProxyConfig(backends=[]).routing())
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "Ωmega", "kv", "12", "cache,", "x\n\ny"]
    doc = " ".join(rng.choice(words) for _ in range(2500))
    for q in range(4):
        for salt in (None, "tenant-a"):
            text = doc + f" question {q} " + " ".join(rng.choice(words) for _ in range(q * 40))
            got = r.text_context(text, 8, cache_salt=salt, lazy=False)
            want = r.context(TOK.encode(text), 8, cache_salt=salt)
            assert got.hashes == want.hashes and got.num_tokens == want.num_tokens
    assert r.chunked.hits > r.chunked.misses


def test_long_distinct_questions_still_reuse_the_documents_hashes():
    from proxy.config import ProxyConfig
    from proxy.routing.router import Router

    r = Router(ProxyConfig(backends=[]).routing())
    rng = random.Random(2)
    doc = " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(3000))
    hashed: list[int] = []
    real = r.hasher.hashes
    r.hasher = type("Spy", (), {
        "block_size": 16,
        "hashes": lambda self, ids, **kw: hashed.append(len(ids) // 16 - kw.get("start_block", 0)) or real(ids, **kw),
    })()
    per_question = []
    for q in range(3):
        text = doc + " " + " ".join(rng.choice(["why", "how", "when"]) for _ in range(600 + q))
        hashed.clear()
        assert r.text_context(text, lazy=False).hashes == r.hashes(TOK.encode(text))
        per_question.append(sum(hashed[:-1]))  # the last call is the reference r.hashes()
    doc_blocks = len(TOK.encode(doc)) // 16
    # The first question hashed the document; later ones only what follows its cached prefix.
    assert per_question[0] > doc_blocks and all(n < per_question[0] - doc_blocks + 80 for n in per_question[1:])
