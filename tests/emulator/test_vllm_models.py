"""Emulator responses validated against vLLM 0.32's own pydantic models, in the vLLM venv.

Completions, chat, streams (every chunk, the usage chunk), logprobs, n > 1, multi-prompt, errors,
/v1/models, /tokenize, /detokenize. The vLLM venv (tools/vllm_env.sh, or KVROUTE_VLLM_VENV) runs
tests/emulator/vllm_protocol_check.py as a subprocess (tests/conftest.py's `vllm_toolchain` builds it).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulator

MODEL = "meta-llama/Llama-2-13b-hf"
DOC = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 4
USER = [{"role": "user", "content": DOC}]
CHECK = Path(__file__).with_name("vllm_protocol_check.py")


async def collect(url: str) -> list[dict]:
    """(what, vLLM model name, body) for every response shape the emulator produces."""
    items: list[dict] = []

    async def body(method: str, path: str, model: str, what: str, payload: dict | None = None) -> None:
        async with s.request(method, url + path, json=payload) as r:
            items.append({"what": what, "model": model, "body": await r.json()})

    async def stream(path: str, model: str, what: str, payload: dict) -> None:
        async with s.post(url + path, json={**payload, "stream": True}) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: {"):
                    items.append({"what": what, "model": model, "body": json.loads(line[6:])})

    usage = {"stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as s:
        comp, chat = "/v1/completions", "/v1/chat/completions"
        await body("POST", comp, "CompletionResponse", "completion", {"prompt": DOC, "max_tokens": 4})
        await body("POST", comp, "CompletionResponse", "completion logprobs echo", {"prompt": DOC, "max_tokens": 3,
                                                                                   "logprobs": 2, "echo": True})
        await body("POST", comp, "CompletionResponse", "completion prompt_logprobs", {"prompt": DOC, "max_tokens": 2,
                                                                                     "prompt_logprobs": 1})
        await body("POST", comp, "CompletionResponse", "completion n=2, two prompts", {"prompt": [DOC, "hello"],
                                                                                      "max_tokens": 3, "n": 2})
        await stream(comp, "CompletionStreamResponse", "completion stream", {"prompt": DOC, "max_tokens": 4, **usage,
                                                                            "logprobs": 1})
        await stream(comp, "CompletionStreamResponse", "completion stream continuous usage",
                     {"prompt": [DOC, "hi"], "max_tokens": 3, "stream_options": {"include_usage": True,
                                                                                "continuous_usage_stats": True}})
        await body("POST", chat, "ChatCompletionResponse", "chat", {"messages": USER, "max_tokens": 4})
        await body("POST", chat, "ChatCompletionResponse", "chat logprobs n=2", {"messages": USER, "max_tokens": 3,
                                                                               "logprobs": True, "top_logprobs": 2,
                                                                               "n": 2})
        await stream(chat, "ChatCompletionStreamResponse", "chat stream", {"messages": USER, "max_tokens": 4,
                                                                          "logprobs": True, "top_logprobs": 1,
                                                                          **usage})
        await body("POST", comp, "ErrorResponse", "error 400", {"prompt": DOC, "max_tokens": 0})
        await body("POST", comp, "ErrorResponse", "error 404", {"model": "nope", "prompt": DOC})
        await body("GET", "/v1/models", "ModelList", "models")
        await body("POST", "/tokenize", "TokenizeResponse", "tokenize", {"prompt": "hello world",
                                                                         "return_token_strs": True})
        await body("POST", "/detokenize", "DetokenizeResponse", "detokenize", {"tokens": [15339, 1917]})
    return items


# The first test to need vLLM builds the toolchain (minutes on a fresh machine): give it room.
@pytest.mark.timeout(1800)
async def test_responses_validate_against_vllms_pydantic_models(vllm_toolchain):
    py = str(vllm_toolchain.python)
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    try:
        items = await collect(em.url)
    finally:
        await em.stop()
    assert len({i["what"] for i in items}) == 14
    # Two bodies the check must reject, so a check that passes everything cannot pass this test.
    chat = next(i for i in items if i["what"] == "chat")
    bad_msg = {**chat["body"], "choices": [{**chat["body"]["choices"][0], "message": {
        **chat["body"]["choices"][0]["message"], "reasoning_content": None}}]}
    bad_type = {**items[0]["body"], "choices": [{**items[0]["body"]["choices"][0], "index": "zero"}]}
    canaries = [{"what": "canary key", "model": "ChatCompletionResponse", "body": bad_msg},
                {"what": "canary type", "model": "CompletionResponse", "body": bad_type}]
    out = subprocess.run([py, str(CHECK)], input=json.dumps(items + canaries), capture_output=True, text=True,
                         timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    problems = result["problems"]
    for note in result["notes"]:
        print("note:", json.dumps(note))
    real = [p for p in problems if not p["what"].startswith("canary")]
    assert real == [], json.dumps(real, indent=1)[:4000]
    assert [p["what"] for p in problems] == ["canary key", "canary type"]
    assert problems[0].get("unknown_keys") == ["ChatCompletionResponse.choices[0].message.reasoning_content"]
