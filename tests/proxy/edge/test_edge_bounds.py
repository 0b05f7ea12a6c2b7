"""Work per request is bounded by the limits, not by what a client sends: an oversized prompt is
rejected after tokenizing about max_model_len tokens of it, the backend tokenizer's cache has a byte
budget, and a bearer token that is not UTF-8 is a 401 on /admin."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kvblocks import get_tokenizer
from proxy.config import ProxyConfig
from proxy.routing.router import Router

from ..conftest import MODEL, TIME_SCALE
from .test_front import read_response

TOK = get_tokenizer()
LIMIT = 4096
BIG_TEXTS = {  # ~8 MB prompts of the shapes that used to be tokenized whole (or scanned to the end)
    "words": "hello " * 1_300_000,
    "digits": "1 " * 3_900_000,
    "one run": "a" * 7_800_000,
    "multi-byte": "é" * 300_000,  # under 128 chars per token of the limit, over 128 bytes
}


class CountingTokenizer:
    """The real tokenizer, counting the characters it is asked to encode."""

    name = TOK.name

    def __init__(self) -> None:
        self.chars = 0

    def encode(self, text: str) -> list[int]:
        self.chars += len(text)
        return TOK.encode(text)


@pytest.mark.parametrize("shape", ["words", "digits"])
def test_tokenizing_an_oversized_prompt_stops_near_the_limit(shape):
    router = Router(ProxyConfig(backends=[]).routing())
    counting = CountingTokenizer()
    router.chunked.tokenizer = counting
    router.add_backend("http://10.0.0.1:8000")
    ctx = router.text_context(BIG_TEXTS[shape], 16)
    router.complete(ctx, stop_at=LIMIT + 1)
    assert ctx.num_tokens > LIMIT and not ctx.complete
    assert counting.chars < 16 * LIMIT  # a few chunks past the limit, not 8 MB


def test_chunk_cuts_stay_exact_where_no_space_precedes_a_letter():
    from proxy.routing.tokenize_cache import ChunkedTokenizer

    ct = ChunkedTokenizer(TOK, chunk_chars=16)
    for text in ("1 1 1 " * 300, "x !y " * 200 + "z", " , , ,\t ,\n , ." * 100, "a  b 12 345 6,7 " * 120, "é " * 700):
        assert ct.encode(text) == TOK.encode(text)


async def test_an_8_mb_prompt_is_a_fast_400_and_admin_rejects_a_non_utf8_key(make_proxy):
    proxy = await make_proxy(max_model_len=LIMIT, admin_key="sekret")
    async with aiohttp.ClientSession() as s:
        for shape, text in BIG_TEXTS.items():
            body = json.dumps({"model": MODEL, "prompt": text, "max_tokens": 4}).encode()
            async with s.post(proxy.url + "/v1/completions", data=body) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and "maximum context length is 4096" in err["message"], shape
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /admin/backends HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n\r\n")
    status, _, data = await read_response(reader)
    writer.close()
    assert status == 401 and json.loads(data)["error"]["code"] == 401


async def test_the_backend_tokenizer_cache_keeps_to_its_byte_budget(emulators):
    from proxy.app import start_proxy

    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in emulators], time_scale=TIME_SCALE,
                                          tokenizer="backend", health_interval=0.2))
    try:
        tok = proxy.context.backend_tokenizer
        tok.max_bytes = 200_000

        async def ask(session: aiohttp.ClientSession, prompt: str) -> None:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            async with session.post(proxy.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()

        async with aiohttp.ClientSession() as s:
            for i in range(40):  # ~27 kB each by the cache's estimate
                await ask(s, f"prompt {i} " + "word " * 600)
            assert 0 < tok.bytes <= tok.max_bytes and len(tok._cache) < 40
            entries = len(tok._cache)
            await ask(s, "other " * 1500)  # over a quarter of the budget: answered, not kept
            assert len(tok._cache) == entries and tok.bytes <= tok.max_bytes
    finally:
        await proxy.stop()
