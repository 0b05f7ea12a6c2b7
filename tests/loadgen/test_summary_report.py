"""Summary statistics, plots and report from known records (no servers): the numbers are the records'."""
from pathlib import Path

import pytest

from loadgen.backend_metrics import MetricsSample, parse_metrics
from loadgen.client import RequestRecord
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.plots import compare_plots, run_plots
from loadgen.report import compare_report, run_report
from loadgen.results import read_records, write_records
from loadgen.runner import RunResult
from loadgen.summary import summarize
from loadgen.workloads import build_workload


def _result(label="s", scale=10.0, name="prefix-sweep"):
    cfg = RunConfig(time_scale=scale, concurrency=2, workload=WorkloadConfig(name=name, requests=6))
    wl = build_workload(cfg.workload)
    recs = []
    for i in range(5):
        recs.append(RequestRecord(i, i, 0, "completions", start=0.1 * i, ok=True, status=200, ttft=0.01 * (i + 1),
                                  tpot=0.002, e2e=0.1, prompt_tokens=100, cached_tokens=64 if i % 2 else 0,
                                  completion_tokens=10, backend=f"http://127.0.0.1:{9000 + i % 2}",
                                  strategy=label, matched_blocks=4 if i % 2 else 0, tags={"prefix_len": 16 * i}))
    recs.append(RequestRecord(5, 5, 0, "completions", start=0.6, status=503, error="APIStatusError: busy"))
    samples = [MetricsSample(0.1 * k, f"http://127.0.0.1:{9000 + b}", running=1 + b, waiting=b, kv_usage=0.5)
               for k in range(4) for b in range(2)]
    return RunResult(label, wl, cfg, "concurrency 2", "m", recs, samples,
                     metrics_before={"u": {"prefix_hits": 10.0}}, metrics_after={"u": {"prefix_hits": 138.0}},
                     duration=1.0)


def test_summary_counts_and_rates():
    s = summarize(_result())
    assert s["requests_sent"] == 6 and s["ok"] == 5 and s["errors"] == 1
    assert s["error_kinds"] == {"APIStatusError: busy": 1}
    assert s["hit_rate"] == pytest.approx(128 / 500)
    assert s["ttft_p50"] == pytest.approx(0.03) and s["ttft_p50_emulated"] == pytest.approx(0.003)
    assert s["throughput_rps"] == pytest.approx(5.0) and s["throughput_rps_emulated"] == pytest.approx(50.0)
    assert s["hit_requests"] == 2 and s["miss_requests"] == 3
    assert s["per_backend"]["http://127.0.0.1:9000"]["requests"] == 3
    assert s["backend_metrics"]["running_mean_per_backend"] == pytest.approx(1.5)
    assert s["backend_metrics"]["prefix_hits_delta_total"] == 128.0
    assert set(s["by_prefix_len"]) == {"0", "16", "32", "48", "64"}


def test_files_plots_and_reports(tmp_path: Path):
    res = _result()
    write_records(tmp_path, res)
    assert len(read_records(tmp_path)) == 6
    assert (tmp_path / "records.csv").read_text().count("\n") == 7
    s = summarize(res)
    plots = run_plots(res, tmp_path)
    names = {p.name for p in plots}
    assert {"latency_distribution.png", "hit_rate_over_time.png", "worker_load.png",
            "latency_by_cache_status.png", "prefix_match_length.png", "backend_metrics.png",
            "hit_rate_vs_prefix_length.png"} <= names
    assert all(p.stat().st_size > 5000 for p in plots)
    report = run_report(s, "python -m loadgen run ...", "http://x/v1", plots, tmp_path).read_text()
    assert "python -m loadgen run ..." in report and "![latency_distribution](latency_distribution.png)" in report
    results = {"a": _result("a"), "b": _result("b")}
    sums = {k: summarize(v) for k, v in results.items()}
    cplots = compare_plots(results, sums, tmp_path / "cmp")
    assert {"compare_ttft_hit_rate.png", "compare_backend_metrics.png"} <= {p.name for p in cplots}
    text = compare_report(sums, "cmd", "t", cplots, tmp_path / "cmp").read_text()
    assert "| a | 25.6% |" in text and "| b | 25.6% |" in text


def test_parse_metrics_sums_counters_and_gauges():
    text = """# HELP vllm:num_requests_running x
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:prefix_cache_hits x
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 320.0
# HELP vllm:kv_cache_usage_perc x
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""
    m = parse_metrics(text)
    assert m["running"] == 3.0 and m["prefix_hits"] == 320.0 and m["kv_usage"] == 0.25 and m["waiting"] == 0.0


def test_a_run_where_every_request_failed_draws_no_blank_plots(tmp_path: Path):
    res = _result()
    for r in res.records:
        r.ok, r.status, r.error = False, 503, "APIConnectionError: Connection error. (http://127.0.0.1:9/v1)"
    s = summarize(res)
    plots = run_plots(res, tmp_path)
    # Only the backends' own metrics are left to draw; nothing from requests that never answered.
    assert {p.name for p in plots} == {"backend_metrics.png"}
    report = run_report(s, "cmd", "http://127.0.0.1:9/v1", plots, tmp_path).read_text()
    assert "no request succeeded" in report and "http://127.0.0.1:9/v1" in report
    cplots = compare_plots({"a": res}, {"a": s}, tmp_path / "cmp")
    assert {p.name for p in cplots} == {"compare_backend_metrics.png"}


def test_cached_blocks_use_the_block_size_the_backends_report():
    """Real vLLM on CPU runs 32-token blocks: cached tokens become blocks by the size the backends'
    vllm:cache_config_info reports, not a fixed 16, or prediction accuracy halves."""
    text = 'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="128"} 1.0\n'
    assert parse_metrics(text)["block_size"] == 32.0
    res = _result()
    assert summarize(res)["block_size"] == 16  # nothing reported: vLLM's GPU default
    for r in res.records:
        if r.ok and r.cached_tokens:
            r.matched_blocks = 2  # 64 cached tokens = 2 blocks of 32
    res.metrics_before = {"u": {"prefix_hits": 10.0, "block_size": 32.0}}
    s = summarize(res)
    assert s["block_size"] == 32
    assert s["prediction"]["accuracy"] == 1.0, s["prediction"]
