"""LoRA in the emulator as vLLM 0.32 does it: adapter-keyed hashes and events, at most max_loras
adapters per step (the others wait, later requests go ahead), a load time for a step that brings an
adapter in, vllm:lora_requests_info, the /v1/models cards, runtime loading, served-name aliases, and
bad flags named in one line."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.lora import LoraRegistry
from emulator.request import SamplingParams
from emulator.server import start_emulator
from kvblocks import BlockHasher, LoraKey, extra_keys, hash_to_int

from .test_scheduler import engine, prompt, run, stored

MODEL = "meta-llama/Llama-2-13b-hf"


async def test_adapter_blocks_and_events_carry_the_adapter():
    eng = engine(num_gpu_blocks=40)
    reg = LoraRegistry(MODEL, ["sql=/p/sql", "chat=/p/chat"])
    toks = prompt(50)
    await run(eng, eng.make_request("a", toks, SamplingParams(max_tokens=1), cache_salt="s", lora=reg.get("chat")))
    (ev,) = stored(eng.batches)
    want = BlockHasher(16).hashes(toks, keys=extra_keys(LoraKey("chat", "/p/chat"), "s"))
    assert ev.block_hashes == [hash_to_int(d) for d in want]
    assert (ev.lora_name, ev.lora_id) == ("chat", 2)  # ids in load order from 1
    assert ev.extra_keys == [("chat", "s"), ("chat",), ("chat",)]
    # the same text on the base model hits nothing the adapter cached
    base = eng.make_request("b", toks, SamplingParams(max_tokens=1))
    await run(eng, base)
    assert base.num_cached_tokens == 0


async def test_at_most_max_loras_adapters_run_in_a_step_and_others_go_ahead():
    eng = engine(num_gpu_blocks=80, max_loras=1, lora_load_s=0.5)
    reg = LoraRegistry(MODEL, ["x=/x", "y=/y"])
    reqs = [eng.make_request("x1", prompt(20, 1000), SamplingParams(max_tokens=3), lora=reg.get("x")),
            eng.make_request("y1", prompt(20, 2000), SamplingParams(max_tokens=3), lora=reg.get("y")),
            eng.make_request("b1", prompt(20, 3000), SamplingParams(max_tokens=3))]
    await asyncio.gather(*(run(eng, r) for r in reqs))
    first = {c.req.request_id for c in eng.steps[0].prefills}
    assert first == {"x1", "b1"}  # y1 waited for x's slot; the base request behind it went ahead
    loads = [s for s in eng.steps if any(c.req.seq.lora_name == "y" for c in s.prefills)]
    assert loads  # y ran once x had finished
    assert eng._clock >= 2 * 0.5  # two adapter loads were paid


async def test_emulator_api_models_load_unload_metrics_and_aliases():
    cfg = EmulatorConfig(port=0, time_scale=0.01, log_requests=False, lora_modules=["sql=/p/sql"], max_loras=2,
                         served_model_aliases=["llama"])
    em = await start_emulator(cfg)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(em.url + "/v1/models") as r:
                cards = {m["id"]: (m["root"], m["parent"]) for m in (await r.json())["data"]}
            assert cards == {MODEL: (MODEL, None), "llama": (MODEL, None), "sql": ("/p/sql", MODEL)}
            async with s.post(em.url + "/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 1}) as r:
                assert (await r.json())["model"] == MODEL  # answered under the first served name
            async with s.post(em.url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/q"}) as r:
                assert r.status == 400 and "already been loaded" in (await r.json())["error"]["message"]
            async with s.post(em.url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p/new"}) as r:
                assert r.status == 200
            async with s.post(em.url + "/v1/completions", json={"model": "new", "prompt": "hi", "max_tokens": 1}) as r:
                assert r.status == 200 and (await r.json())["model"] == "new"
            async with s.post(em.url + "/v1/unload_lora_adapter", json={"lora_name": "new"}) as r:
                assert r.status == 200
            async with s.post(em.url + "/v1/completions", json={"model": "new", "prompt": "hi", "max_tokens": 1}) as r:
                assert r.status == 404
            async with s.get(em.url + "/metrics") as r:
                info = [ln for ln in (await r.text()).splitlines() if ln.startswith("vllm:lora_requests_info{")]
            assert info and all('max_lora="2"' in ln for ln in info)
    finally:
        await em.stop()


async def test_without_lora_there_is_no_load_endpoint():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    try:
        async with aiohttp.ClientSession() as s, s.post(em.url + "/v1/load_lora_adapter",
                                                        json={"lora_name": "a", "lora_path": "/a"}) as r:
            assert r.status == 404
    finally:
        await em.stop()


@pytest.mark.parametrize("argv,flag", [(["--lora-modules", "nopath"], "lora"), (["--max-loras", "0"], "max")])
def test_bad_lora_flags_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        EmulatorConfig.from_cli(argv, env={})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_served_model_name_takes_aliases():
    cfg = EmulatorConfig.from_cli(["--served-model-name", MODEL, "llama", "l2"], env={})
    assert (cfg.model, cfg.served_model_aliases) == (MODEL, ["llama", "l2"])
