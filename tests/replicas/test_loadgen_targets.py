"""`loadgen run --also-target`: requests spread round robin over replicas of a proxy."""
from __future__ import annotations

from dataclasses import replace

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from loadgen.__main__ import build_parser, configs
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.runner import run_workload
from loadgen.workloads import build_workload
from proxy.config import ProxyConfig
from proxy.app import start_proxy


def test_also_target_flags_become_targets():
    ns = build_parser().parse_args(["run", "--target", "http://a:1/v1", "--also-target", "http://b:2/v1",
                                    "--also-target", "c:3/v1"])
    cfg = configs(ns)
    assert cfg.targets() == ["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"]


async def test_requests_alternate_over_the_targets():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=0.01, log_requests=False), 2)
    base = ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=0.01)
    proxies = [await start_proxy(replace(base)) for _ in range(3)]
    try:
        wl = WorkloadConfig(name="rag", requests=12, documents=2, doc_tokens_min=100, doc_tokens_max=200, output_tokens=2)
        cfg = RunConfig(target=proxies[0].url + "/v1", also_targets=",".join(p.url + "/v1" for p in proxies[1:]),
                        concurrency=2, time_scale=0.01, progress=False, workload=wl)
        result = await run_workload(build_workload(wl), cfg)
        assert sum(r.ok for r in result.records) == 12
        assert [sum(b.processed for b in p.router.registry) for p in proxies] == [4, 4, 4]
    finally:
        for p in proxies:
            await p.stop()
        for e in ems:
            await e.stop()
