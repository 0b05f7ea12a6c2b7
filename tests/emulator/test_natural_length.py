"""A request without max_tokens ends as a model's answer does: EOS after a length drawn per request
(emulator.output_length), with ignore_eos, min_tokens and max_tokens honoured as vLLM 0.32 does
(vllm/v1/core/sched/utils.py check_stop: the length cap, then EOS unless ignore_eos; min_tokens
masks EOS before it). Real emulator over HTTP; the same request always gets the same length."""
from __future__ import annotations

import statistics

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.output_length import LengthDistribution, parse_length_distribution
from emulator.server import start_emulator


async def _chat(s: aiohttp.ClientSession, url: str, text: str, **body) -> dict:
    async with s.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **body}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def _ended(out: dict) -> tuple[int, str]:
    return out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]


@pytest.fixture
async def emu(request):
    spec = getattr(request, "param", None)
    kw = {"natural_length": spec} if spec else {}
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.0005, log_requests=False, max_model_len=1024,
                                             num_gpu_blocks=200, **kw))
    try:
        async with aiohttp.ClientSession() as s:
            yield s, em.url
    finally:
        await em.stop()


async def test_a_chat_without_max_tokens_ends_with_eos_at_a_realistic_length(emu):
    s, url = emu
    lengths, ends = [], []
    for i in range(40):
        n, why = _ended(await _chat(s, url, f"question number {i} about routing"))
        lengths.append(n)
        ends.append(why)
    # ~3% of draws pass the ~1,000 tokens left in this 1,024-token context: those end by length
    assert ends.count("stop") >= 36 and all(n > 950 for n, e in zip(lengths, ends) if e == "length"), (lengths, ends)
    again = [_ended(await _chat(s, url, f"question number {i} about routing"))[0] for i in range(5)]
    assert again == lengths[:5]  # deterministic per request
    assert len(set(lengths)) > 20  # drawn per request, not the context limit
    assert 60 < statistics.median(lengths) < 350  # the default's median is 150 tokens


@pytest.mark.parametrize("emu", ["fixed:7"], indirect=True)
async def test_ignore_eos_min_tokens_and_max_tokens_are_honoured(emu):
    s, url = emu
    assert _ended(await _chat(s, url, "hi")) == (7, "stop")  # EOS is the 7th output token
    assert _ended(await _chat(s, url, "hi", min_tokens=12)) == (13, "stop")  # no EOS before min_tokens
    assert _ended(await _chat(s, url, "hi", max_tokens=30)) == (30, "length")  # set: exactly that many
    assert _ended(await _chat(s, url, "hi", max_tokens=5)) == (5, "length")
    n, why = _ended(await _chat(s, url, "hi", ignore_eos=True))  # no EOS: to the context limit
    assert why == "length" and n > 900
    async with s.post(url + "/v1/completions", json={"prompt": "hi there"}) as r:
        out = await r.json()
    assert _ended(out) == (7, "stop")  # completions: EOS before vLLM's default cap of 16
    async with s.post(url + "/v1/completions", json={"prompt": "hi there", "max_tokens": 9}) as r:
        assert _ended(await r.json()) == (9, "length")


@pytest.mark.parametrize("emu", ["off"], indirect=True)
async def test_off_generates_to_the_cap_as_before(emu):
    s, url = emu
    n, why = _ended(await _chat(s, url, "hi"))
    assert why == "length" and n > 900


def test_specs_parse_and_a_bad_one_says_which_forms_exist():
    assert parse_length_distribution("lognormal:150,1.0") == LengthDistribution("lognormal", 150, 1.0)
    assert parse_length_distribution("uniform:10,20") == LengthDistribution("uniform", 10, 20)
    assert parse_length_distribution("off").draw(None) is None
    for bad in ("normal:1,2", "fixed:0", "uniform:5,2", "lognormal:150", "fixed:x"):
        with pytest.raises(ValueError, match="natural_length"):
            parse_length_distribution(bad)
