"""The HTTP surface against real emulators on loopback, with the real openai SDK as client."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.config import EmulatorConfig
from emulator.metrics import ITL_BUCKETS, TTFT_BUCKETS
from emulator.server import start_emulator, start_emulators

MODEL = "meta-llama/Llama-2-13b-hf"
LONG = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 4


@pytest.fixture
async def emu():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    yield em
    await em.stop()


def sync_client(em) -> openai.OpenAI:
    return openai.OpenAI(base_url=em.url + "/v1", api_key="none", max_retries=0)


def async_client(em) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=em.url + "/v1", api_key="none", max_retries=0)


async def wait_idle(em, deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while em.engine.block_pool.num_referenced_blocks() or em.engine.num_unfinished:
        assert time.monotonic() < end, "engine did not release its blocks"
        await asyncio.sleep(0.005)


async def test_sync_sdk_completion_and_chat(emu):
    client = sync_client(emu)

    def calls():
        c = client.completions.create(model=MODEL, prompt=LONG, max_tokens=7)
        ch = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return c, ch

    c, ch = await asyncio.to_thread(calls)
    assert c.id.startswith("cmpl-") and c.object == "text_completion" and c.model == MODEL
    assert c.choices[0].finish_reason == "length" and c.choices[0].text
    assert c.usage.completion_tokens == 7 and c.usage.total_tokens == c.usage.prompt_tokens + 7
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    assert ch.id.startswith("chatcmpl-") and ch.choices[0].message.role == "assistant"
    assert ch.choices[0].message.content and ch.usage.completion_tokens == 4


async def test_sync_sdk_streaming_with_usage(emu):
    client = sync_client(emu)

    def stream():
        return list(client.completions.create(model=MODEL, prompt=LONG, max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}))

    chunks = await asyncio.to_thread(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == 5 and text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    await wait_idle(emu)


async def test_async_sdk_streaming_chat_and_repeat_hits_cache(emu):
    client = async_client(emu)
    msgs = [{"role": "system", "content": LONG}, {"role": "user", "content": "Tell me a story."}]
    roles, contents, usage = [], [], None
    stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            roles.append(ch.delta.role)
            contents.append(ch.delta.content or "")
    assert roles[0] == "assistant" and contents[0] == ""
    assert len([c for c in contents if c]) == 6
    assert usage.prompt_tokens_details.cached_tokens == 0
    again = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    n = again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == 16 * ((n - 1) // 16)
    assert again.choices[0].message.content == "".join(contents), "same prompt and seed, same text"


async def test_async_sdk_completion_multiple_prompts_and_stream(emu):
    client = async_client(emu)
    r = await client.completions.create(model=MODEL, prompt=["one two", "three four five"], max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    seen = set()
    stream = await client.completions.create(model=MODEL, prompt=[[11, 12, 13], [14, 15]], max_tokens=2, stream=True)
    async for chunk in stream:
        seen.update(c.index for c in chunk.choices)
    assert seen == {0, 1}


async def test_stop_string_ends_with_stop_reason(emu):
    client = async_client(emu)
    full = (await client.completions.create(model=MODEL, prompt="stop test", max_tokens=8)).choices[0].text
    words = full.split(" ")
    stop = " " + words[3]  # the text is " w1 w2 w3 ...": cut before the third word
    r = await client.completions.create(model=MODEL, prompt="stop test", max_tokens=8, stop=[stop])
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and ch.model_extra["stop_reason"] == stop
    assert ch.text == full[: full.index(stop)]


async def test_request_id_header_is_echoed_and_used(emu):
    async with aiohttp.ClientSession() as s:
        async with s.post(emu.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2},
                          headers={"X-Request-ID": "abc-123"}) as r:
            body = await r.json()
            assert r.headers["X-Request-ID"] == "abc-123"
            assert body["id"] == "cmpl-abc-123"
            assert body["choices"][0]["stop_reason"] is None and body["choices"][0]["logprobs"] is None


async def test_client_disconnect_mid_stream_frees_blocks(emu):
    async with aiohttp.ClientSession() as s:
        resp = await s.post(emu.url + "/v1/completions", json={"prompt": LONG, "max_tokens": 2000, "stream": True,
                                                               "ignore_eos": True})
        line = await resp.content.readline()
        assert line.startswith(b"data: ")
        assert emu.engine.block_pool.num_referenced_blocks() > 0
        resp.close()
    await wait_idle(emu)
    assert emu.engine.num_running == 0


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/completions", {"prompt": [1, -5]}, 400, "prompt"),
        ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"prompt": "x"}, 400, "messages"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ],
)
async def test_bad_input_gets_vllm_error_json(emu, path, body, status, param):
    async with aiohttp.ClientSession() as s:
        kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        async with s.post(emu.url + path, **kw) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert err["code"] == status and err["param"] == param
            assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
            assert err["message"]


async def test_prompt_longer_than_context_is_rejected_like_vllm(emu):
    client = async_client(emu)
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt=list(range(100, 4200)), max_tokens=16)
    assert "maximum context length is 4096 tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x")


async def test_models_health_version_tokenize_reset(emu):
    async with aiohttp.ClientSession() as s:
        async with s.get(emu.url + "/v1/models") as r:
            m = (await r.json())["data"][0]
            assert m["id"] == MODEL and m["owned_by"] == "vllm" and m["max_model_len"] == 4096 and m["root"] == MODEL
            assert m["permission"][0]["object"] == "model_permission"
        async with s.get(emu.url + "/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with s.get(emu.url + "/version") as r:
            assert "version" in await r.json()
        async with s.post(emu.url + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}) as r:
            t = await r.json()
            assert t["count"] == len(t["tokens"]) == 2 and t["max_model_len"] == 4096 and t["token_strs"] == ["hello", " world"]
        async with s.post(emu.url + "/detokenize", json={"tokens": t["tokens"]}) as r:
            assert (await r.json())["prompt"] == "hello world"
        async with s.get(emu.url + "/no/such/route") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == 404
        client = async_client(emu)
        await client.completions.create(model=MODEL, prompt=LONG, max_tokens=1)
        async with s.post(emu.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        again = await client.completions.create(model=MODEL, prompt=LONG, max_tokens=1)
        assert again.usage.prompt_tokens_details.cached_tokens == 0


async def test_metrics_exposition_parses_with_vllm_names(emu):
    client = async_client(emu)
    for _ in range(2):
        await client.completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    async with aiohttp.ClientSession() as s:
        async with s.get(emu.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:cache_config_info",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:num_preemptions", "vllm:request_success"]:
        assert name in fams, name
    assert "_created" not in text
    for fam in fams.values():
        if fam.name.startswith("vllm:"):
            for sample in fam.samples:
                assert sample.labels["model_name"] == MODEL and sample.labels["engine"] == "0"

    def value(fam, suffix="", **labels):
        return next(s.value for s in fams[fam].samples
                    if s.name == fam + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    prompt_tokens = value("vllm:prompt_tokens", "_total")
    assert value("vllm:prefix_cache_queries", "_total") == prompt_tokens
    assert value("vllm:prefix_cache_hits", "_total") == 16 * ((prompt_tokens // 2 - 1) // 16)
    assert value("vllm:request_success", "_total", finished_reason="length") == 2
    assert value("vllm:generation_tokens", "_total") == 8
    assert value("vllm:num_requests_running") == 0 and value("vllm:kv_cache_usage_perc") == 0
    info = fams["vllm:cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["num_gpu_blocks"] == "924" and info.labels["block_size"] == "16"
    assert info.labels["enable_prefix_caching"] == "True" and info.labels["prefix_caching_hash_algo"] == "sha256"
    ttft_les = [float(s.labels["le"]) for s in fams["vllm:time_to_first_token_seconds"].samples
                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert ttft_les == list(TTFT_BUCKETS)
    itl_les = [float(s.labels["le"]) for s in fams["vllm:inter_token_latency_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert itl_les == list(ITL_BUCKETS)
    # emulated seconds: the isolated TTFT of the first request, not the scaled wall time
    assert value("vllm:time_to_first_token_seconds", "_sum") > 0.02


async def test_replicas_have_their_own_pools():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=0.01, log_requests=False), 2)
    try:
        assert ems[0].port != ems[1].port and ems[0].engine is not ems[1].engine
        await async_client(ems[0]).completions.create(model=MODEL, prompt=LONG, max_tokens=1)
        r = await async_client(ems[1]).completions.create(model=MODEL, prompt=LONG, max_tokens=1)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        for em in ems:
            await em.stop()


async def test_prompt_tokens_details_can_be_turned_off():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False,
                                             enable_prompt_tokens_details=False))
    try:
        r = await async_client(em).completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert r.usage.prompt_tokens_details is None
    finally:
        await em.stop()


def test_python_m_emulator_subprocess_serves_openai_sdk():
    env = {**os.environ, "KVROUTE_EMU_TIME_SCALE": "0.01"}
    proc = subprocess.Popen([sys.executable, "-m", "emulator", "--port", "0", "--no-log-requests"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        line = proc.stdout.readline()  # blocks until the server printed where it listens (or died)
        assert line.startswith("EMULATOR_URL "), proc.stderr.read()
        url = line.split()[1]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=3)
        assert r.usage.completion_tokens == 3
        s = client.completions.create(model=MODEL, prompt=LONG, max_tokens=3, stream=True)
        assert sum(1 for c in s if c.choices and c.choices[0].text) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
    assert rc == 0
