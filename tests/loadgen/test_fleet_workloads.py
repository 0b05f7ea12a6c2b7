"""The lora and multimodel workloads through a real proxy to real emulators: every request names its
own model (an adapter, or one of several base models), is answered, lands only on a backend serving
it, and shared prefixes are hit."""
from __future__ import annotations

import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulator
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.proxy_admin import ProxyAdmin
from loadgen.runner import run_workload
from loadgen.summary import summarize
from loadgen.workloads import build_workload
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .conftest import FAST

pytestmark = pytest.mark.timeout(120)


async def run(emulators: list[EmulatorConfig], wl: WorkloadConfig):
    ems = [await start_emulator(c) for c in emulators]
    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=FAST, health_interval=0.1,
                                          metrics_interval=0.1, log_level="warning"))
    try:
        target = proxy.url + "/v1"
        backends = await ProxyAdmin(target).backends()
        cfg = RunConfig(target=target, time_scale=FAST, progress=False, metrics_interval=0.05, concurrency=4,
                        workload=wl)
        workload = build_workload(wl)
        res = await run_workload(workload, cfg, backends)
        serves = {e.url: {e.config.model, *(m.split("=")[0] for m in e.config.lora_modules)} for e in ems}
        return workload, res, summarize(res), serves
    finally:
        await proxy.stop()
        for e in ems:
            await e.stop()


def emu(model: str = "meta-llama/Llama-2-13b-hf", lora=()) -> EmulatorConfig:
    return EmulatorConfig(port=0, model=model, num_gpu_blocks=300, max_model_len=2048, time_scale=FAST,
                          log_requests=False, lora_modules=list(lora))


async def test_lora_workload(tmp_path):
    wl = WorkloadConfig(name="lora", requests=24, adapters=3, base_tokens=120, system_tokens=80, question_tokens=16,
                        output_tokens=4, max_model_len=2048)
    workload, res, s, serves = await run(
        [emu(lora=["lora-0=/a/0", "lora-1=/a/1", "lora-2=/a/2"]), emu(lora=["lora-0=/a/0"])], wl)
    assert s["ok"] == 24 and s["errors"] == 0
    by_index = {r.index: r for r in res.records}
    for spec in workload.requests:
        rec = by_index[spec.index]
        assert spec.model in serves[rec.backend], (spec.model, rec.backend)
        assert rec.prompt_tokens == spec.prompt_tokens
        assert rec.cached_tokens % 16 == 0 and rec.cached_tokens < rec.prompt_tokens
    assert s["cached_tokens"] > 0  # each adapter's preamble and system prompt are reused on its backends


async def test_multimodel_workload(tmp_path):
    wl = WorkloadConfig(name="multimodel", requests=24, models=("model-a", "model-b"), system_prompts=2,
                        system_tokens=100, question_tokens=16, output_tokens=4, max_model_len=2048)
    workload, res, s, serves = await run([emu("model-a"), emu("model-a"), emu("model-b")], wl)
    assert s["ok"] == 24 and s["errors"] == 0
    by_index = {r.index: r for r in res.records}
    assert {spec.model for spec in workload.requests} == {"model-a", "model-b"}
    for spec in workload.requests:
        assert spec.model in serves[by_index[spec.index].backend]
    assert s["cached_tokens"] > 0


def test_multimodel_needs_models():
    with pytest.raises(ValueError, match="--models"):
        WorkloadConfig(name="multimodel")
