"""Every workload against a real proxy + emulators: records and summary agree with what the servers report."""
import asyncio
import socket
from pathlib import Path

import orjson
import pytest

from loadgen.backend_metrics import scrape_all
from loadgen.compare import compare
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.proxy_admin import ProxyAdmin
from loadgen.runner import Runner, run_workload
from loadgen.summary import summarize
from loadgen.workloads import build_workload

from .conftest import FAST

SMALL = {
    "rag": dict(documents=3, doc_tokens_min=200, doc_tokens_max=400),
    "multiturn": dict(turns=3, turn_tokens=40, think_time=0.2),
    "sysprompt": dict(system_prompts=2, system_tokens=150, few_shot=1),
    "prefix-sweep": dict(prefix_lengths=(0, 64, 256)),
    "tenants": dict(tenants=3, tenant_tokens=300, users_per_tenant=2),
    "trace": dict(trace_max_output=8, max_model_len=1024),
}


def _cfg(target, name, requests=9, **run):
    wl = WorkloadConfig(name=name, requests=requests, output_tokens=8, question_tokens=16, **SMALL[name])
    return RunConfig(target=target, time_scale=FAST, progress=False, metrics_interval=0.05,
                     **({"concurrency": 3} if not run else run), workload=wl)


@pytest.mark.parametrize("name", list(SMALL))
async def test_workload_records_match_the_emulators(stack, name):
    admin = ProxyAdmin(stack)
    backends = await admin.backends()
    assert len(backends) == 2
    # The trace replays its own timestamps (the first 12 lines span 3 s, 60 ms at this time scale).
    cfg = _cfg(stack, name, requests=12, rate=0.0) if name == "trace" else _cfg(stack, name)
    wl = build_workload(cfg.workload)
    res = await run_workload(wl, cfg, backends)
    s = summarize(res)
    assert s["ok"] == len(wl.requests) and s["errors"] == 0
    for r in res.records:
        assert r.prompt_tokens == r.expected_prompt_tokens
        assert r.completion_tokens == 8 if name != "trace" else r.completion_tokens == r.max_tokens
        assert r.backend in backends and r.strategy and r.ttft is not None and r.e2e >= r.ttft
        assert r.cached_tokens % 16 == 0 and r.cached_tokens < r.prompt_tokens
    # The load generator's cached-token count is exactly what the emulators' counters moved by.
    bm = s["backend_metrics"]
    assert bm["prefix_hits_delta_total"] == s["cached_tokens"]
    assert bm["prefix_queries_delta_total"] == s["prompt_tokens"]
    if name in ("rag", "sysprompt", "tenants", "multiturn"):
        assert s["cached_tokens"] > 0
    # Waits follow emulated time x time scale: trace arrivals and multiturn think times are honoured.
    by_index = {r.index: r for r in res.records}
    for spec in wl.requests:
        rec = by_index[spec.index]
        if spec.arrival is not None:
            assert rec.start >= spec.arrival * FAST - 1e-3
        if spec.turn:
            prev = next(r for r in res.records if r.chain == spec.chain and r.turn == spec.turn - 1)
            assert rec.start >= prev.start + prev.e2e + spec.think_time * FAST - 1e-3
    if name == "trace":
        assert res.duration < 3.0 * FAST + 5.0  # the 3 emulated s the first 12 lines span, scaled; unscaled would be 150 s
    after = await scrape_all(backends)
    assert all(m["running"] == 0 and m["waiting"] == 0 for m in after.values())


async def test_poisson_run_and_sweep_by_length(stack):
    cfg = _cfg(stack, "prefix-sweep", requests=12, rate=400.0)
    res = await run_workload(build_workload(cfg.workload), cfg, await ProxyAdmin(stack).backends())
    s = summarize(res)
    assert s["ok"] == 12 and set(s["by_prefix_len"]) == {"0", "64", "256"}
    assert s["by_prefix_len"]["0"]["hit_rate"] == 0.0


async def test_failures_are_counted_not_dropped(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = _cfg(f"http://127.0.0.1:{port}/v1", "rag", requests=5)
    res = await run_workload(build_workload(cfg.workload), cfg)
    s = summarize(res)
    assert len(res.records) == 5 and s["errors"] == 5 and s["ok"] == 0
    assert all("Connection" in r.error for r in res.records)


async def test_server_errors_are_recorded_with_status(stack):
    cfg = _cfg(stack, "rag", requests=4)
    cfg.workload.max_model_len = 16384
    cfg.workload.doc_tokens_min = cfg.workload.doc_tokens_max = 5000
    res = await run_workload(build_workload(cfg.workload), cfg)
    assert [r.status for r in res.records] == [400] * 4
    assert summarize(res)["errors"] == 4


async def test_interrupt_keeps_what_was_measured(stack):
    cfg = _cfg(stack, "rag", requests=40, concurrency=2)
    cfg.workload.output_tokens = 400
    runner = Runner(build_workload(cfg.workload), cfg)
    task = asyncio.create_task(runner.run())
    deadline = asyncio.get_running_loop().time() + 30
    while not runner.records_so_far and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)  # polling for the first finished request, bounded by the deadline
    runner.interrupt()
    res = await task
    s = summarize(res)
    assert res.interrupted and s["cancelled"] >= 1 and len(res.records) < 40
    assert s["ok"] + s["errors"] + s["cancelled"] == len(res.records)


async def test_compare_writes_summary_plots_and_report(tmp_path: Path):
    cfg = RunConfig(time_scale=FAST, concurrency=3, progress=False, metrics_interval=0.05, out=str(tmp_path),
                    workload=WorkloadConfig(name="rag", requests=12, output_tokens=8, documents=4,
                                            doc_tokens_min=300, doc_tokens_max=500))
    res = await compare(cfg, ["default", "round_robin", "least_loaded"], None, "python -m loadgen compare ...", 2,
                        spawn="inprocess")
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert len(summary) == 3 and "round_robin" in summary and "least_loaded" in summary
    for name, s in summary.items():
        for key in ("hit_rate", "ttft_p50", "ttft_p99", "throughput_rps", "errors"):
            assert key in s
        assert s["ok"] == 12 and s["strategy"] == name
        assert s["backend_metrics"]["prefix_hits_delta_total"] == s["cached_tokens"]
        assert (tmp_path / name / "records.jsonl").exists()
    assert {p.name for p in res.plots} >= {"compare_ttft_hit_rate.png", "compare_backend_metrics.png"}
    report = (tmp_path / "report.md").read_text()
    assert "python -m loadgen compare ..." in report and "round_robin" in report
    assert "![compare_ttft_hit_rate](compare_ttft_hit_rate.png)" in report
