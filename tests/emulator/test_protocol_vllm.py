"""Protocol details where the emulator now answers as vLLM 0.32 does (real emulator, real openai SDK):
logprobs, n > 1, best_of, multi-prompt cached tokens, chat message fields, created_cache_tokens,
prompt_logprobs, a chunk per token in streams and /reset_prefix_cache."""
from __future__ import annotations

import aiohttp
import openai
import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulator

MODEL = "meta-llama/Llama-2-13b-hf"
DOC = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 4  # ~76 tokens
USER = [{"role": "user", "content": DOC}]


@pytest.fixture
async def emu():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    yield em
    await em.stop()


def client(em) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=em.url + "/v1", api_key="none", max_retries=0)


async def post(em, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(em.url + path, json=body) as r:
            return r.status, await r.json()


async def test_completion_logprobs_in_vllms_shape(emu):
    c = await client(emu).completions.create(model=MODEL, prompt=DOC, max_tokens=5, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == c.choices[0].text
    assert all(isinstance(x, float) and x < 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 and tok in t for t, tok in zip(lp.top_logprobs, lp.tokens))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


async def test_streamed_completion_logprobs_cover_every_token(emu):
    stream = await client(emu).completions.create(model=MODEL, prompt=DOC, max_tokens=6, logprobs=0, stream=True)
    tokens, text = [], ""
    async for chunk in stream:
        ch = chunk.choices[0]
        text += ch.text
        tokens += ch.logprobs.tokens
        assert all(len(t) == 1 for t in ch.logprobs.top_logprobs)
    assert len(tokens) == 6 and "".join(tokens) == text


async def test_chat_logprobs_and_top_logprobs(emu):
    r = await client(emu).chat.completions.create(model=MODEL, messages=USER, max_tokens=4, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    r0 = await client(emu).chat.completions.create(model=MODEL, messages=USER, max_tokens=2, logprobs=True)
    assert [c.top_logprobs for c in r0.choices[0].logprobs.content] == [[], []]


async def test_parallel_samples_share_the_prompts_blocks(emu):
    c = await client(emu).completions.create(model=MODEL, prompt=DOC, max_tokens=4, n=3, seed=7)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    n_prompt = c.usage.prompt_tokens
    assert c.usage.completion_tokens == 12
    full = (n_prompt - 1) // 16 * 16
    assert c.usage.prompt_tokens_details.cached_tokens == full, "the last sample hit the blocks the first cached"
    assert len({ch.text for ch in c.choices}) == 3, "samples draw their own tokens"
    q = emu.engine.kv_cache_manager.stats
    assert q.queries == 3 * n_prompt and q.hits == 2 * full
    status, _ = await post(emu, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "best_of": 3})
    assert status == 200  # vLLM 0.32's completions have no best_of: accepted, ignored
    status, _ = await post(emu, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "best_of": 3})
    assert status == 200


async def test_multi_prompt_completion_reports_the_last_prompts_cached_tokens(emu):
    cl = client(emu)
    await cl.completions.create(model=MODEL, prompt=DOC, max_tokens=1)
    fresh = "Completely different words about rivers, stones and clouds in the valley. " * 4
    last_hit = await cl.completions.create(model=MODEL, prompt=[fresh, DOC], max_tokens=1)
    assert last_hit.usage.prompt_tokens_details.cached_tokens > 0
    fresh2 = "Yet another text, on forests, embers and frost at the edge of light. " * 4
    last_fresh = await cl.completions.create(model=MODEL, prompt=[DOC, fresh2], max_tokens=1)
    assert last_fresh.usage.prompt_tokens_details.cached_tokens == 0, "the last prompt's, not the sum"


async def test_chat_message_fields_and_created_cache_tokens(emu):
    status, body = await post(emu, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert status == 200
    msg = body["choices"][0]["message"]
    assert "reasoning" in msg and "reasoning_content" not in msg and "tool_calls" not in msg
    details = body["usage"]["prompt_tokens_details"]
    n = body["usage"]["prompt_tokens"]
    assert details == {"cached_tokens": 0, "created_cache_tokens": n // 16 * 16, "multimodal_tokens": None}
    _, again = await post(emu, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    hit = (n - 1) // 16 * 16
    assert again["usage"]["prompt_tokens_details"]["created_cache_tokens"] == n // 16 * 16 - hit


async def test_prompt_logprobs_skip_the_cache_and_come_back(emu):
    cl = client(emu)
    await cl.completions.create(model=MODEL, prompt=DOC, max_tokens=1)
    status, body = await post(emu, "/v1/completions", {"prompt": DOC, "max_tokens": 1, "prompt_logprobs": 1})
    assert status == 200
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    pl = body["choices"][0]["prompt_logprobs"]
    assert len(pl) == body["usage"]["prompt_tokens"] and pl[0] is None
    assert all(len(d) == 1 and all({"logprob", "rank", "decoded_token"} <= set(v) for v in d.values()) for d in pl[1:])


async def test_reset_prefix_cache_answers_success_as_vllm(emu):
    async with aiohttp.ClientSession() as s:
        async with s.post(emu.url + "/reset_prefix_cache") as r:
            assert r.status == 200 and await r.json() == {"success": True}
        stream = await client(emu).completions.create(model=MODEL, prompt=DOC, max_tokens=200, stream=True)
        it = stream.__aiter__()
        await it.__anext__()  # running: holds blocks
        async with s.post(emu.url + "/reset_prefix_cache") as r:
            assert r.status == 200 and await r.json() == {"success": False}
        async with s.post(emu.url + "/reset_prefix_cache?reset_running_requests=true") as r:
            assert r.status == 200 and await r.json() == {"success": True}
        rest = [c async for c in it]
        assert rest[-1].choices[0].finish_reason == "length"  # the preempted request recomputed and finished
        async with s.post(emu.url + "/reset_prefix_cache?reset_running_requests=maybe") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "reset_running_requests"


async def test_every_token_gets_a_chunk_even_while_a_stop_string_holds_its_text(emu):
    cl = client(emu)
    first = (await cl.completions.create(model=MODEL, prompt=DOC, max_tokens=1)).choices[0].text
    stream = await cl.completions.create(model=MODEL, prompt=DOC, max_tokens=5, stream=True, stop=[first + "\u2603"])
    texts = [c.choices[0].text async for c in stream if c.choices]
    assert len(texts) == 5, "one chunk per token, as vLLM streams them"
    assert texts[0] == "" and texts[1].startswith(first), "the held-back text arrives with the next token"
    chat = await cl.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, n=2, stream=True)
    chunks = [c async for c in chat]
    roles = [c.choices[0].index for c in chunks[:2]]
    assert roles == [0, 1] and all(c.choices[0].delta.role == "assistant" for c in chunks[:2]), "role chunks first"
    assert sum(1 for c in chunks[2:] if c.choices) == 6
