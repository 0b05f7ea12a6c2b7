"""Loud failures and honest verdicts (issue #25, items 2 and 3), through the CLI's own code paths.

A router that lists its model as `unknown` (as sglang-router does), in front of real emulators: `run`
takes the backends' model name; a sweep whose every request fails exits 1 naming the point and does
not call its one strategy "highest"; a run whose clocks fell behind is marked invalid at once, in
its report and in `sweep-table`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from emulator.config import EmulatorConfig
from emulator.server import start_emulator
from loadgen.__main__ import _run, _sweep, check_args
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.runner import run_workload
from loadgen.summary import summarize
from loadgen.sweep import SLO, goodput_verdict, sweep, sweep_table, verdict_text
from loadgen.validity import LatenessWatch, invalid_reason
from loadgen.workloads import build_workload

from .conftest import FAST
from .test_peer_router import _peer_router

RAG = ["--workload", "rag", "--requests", "6", "--output-tokens", "4", "--question-tokens", "16", "--documents", "2",
       "--doc-tokens-min", "200", "--doc-tokens-max", "300", "--time-scale", str(FAST), "--no-progress",
       "--metrics-interval", "0.05", "--lateness-limit", "0"]


async def _router(**faults):
    ems = [await start_emulator(EmulatorConfig(port=0, time_scale=FAST, log_requests=False, **faults)) for _ in range(2)]
    runner, target = await _peer_router([e.url for e in ems])
    return ems, runner, target


async def _close(ems, runner) -> None:
    await runner.cleanup()
    for e in ems:
        await e.stop()


async def test_run_through_a_router_that_says_unknown_uses_the_backends_model(tmp_path):
    ems, runner, target = await _router()
    try:
        argv = ["run", "--target", target, "--backend", ems[0].url, "--backend", ems[1].url, "--concurrency", "2",
                "--out", str(tmp_path), *RAG]
        ns, cfg = check_args(argv)
        rc = await _run(ns, cfg, "test")
    finally:
        await _close(ems, runner)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0 and summary["ok"] == 6 and summary["errors"] == 0, summary["error_kinds"]


async def test_a_sweep_whose_point_fails_exits_1_naming_it_and_one_strategy_is_not_highest(tmp_path, capsys):
    ems, runner, target = await _router(fault_error_rate=1.0)
    try:
        argv = ["sweep", "--peer", "other-router", "--target", target, "--reset-target", "--backend", ems[0].url,
                "--backend", ems[1].url, "--rates", "4", "--out", str(tmp_path), *RAG]
        ns, cfg = check_args(argv)
        rc = await _sweep(ns, cfg, "test")
    finally:
        await _close(ems, runner)
    out, err = capsys.readouterr()
    assert rc == 1
    assert "point other-router @ 4 req/s: 6 of 6 requests failed (100.0% > --max-error-share 0.05)" in err
    assert "other-router's goodput: 0 req/s, the only strategy run (nothing to compare it with)" in out
    assert "highest" not in out
    assert json.loads((tmp_path / "sweep.json").read_text())["failed_points"]


def test_a_verdict_over_one_strategy_says_so():
    p = {"seed": 0, "planned": 4, "ok": 4, "errors": 0, "ttft_p99": 0.1, "tpot_p50": 0.01}
    v = goodput_verdict({"only": {4.0: [p]}}, SLO(), "only")
    assert v["verdict"] == "only strategy" and verdict_text(v, " req/s") == \
        "4 req/s, the only strategy run (nothing to compare it with)"
    assert goodput_verdict({"a": {4.0: [p]}, "b": {4.0: [p]}}, SLO(), "a")["verdict"] == "highest"


def test_invalid_reason_names_the_clock_that_fell_behind():
    s = {"time_scale": 0.5, "backend_metrics": {"step_lateness_mean_s": 0.01}, "dispatch_lateness_emulated": None}
    assert invalid_reason(s, 0.03) is None  # 20 emulated ms late, 30 allowed
    assert invalid_reason(s, 0.01).startswith("machine-bound: engine steps 20.0 ms late on average")
    assert invalid_reason(s, 0) is None  # 0 = never
    s = {"time_scale": 1.0, "backend_metrics": {}, "dispatch_lateness_emulated": {"avg": 0.05}}
    assert "requests sent 50.0 ms after their arrival times" in invalid_reason(s, 0.01)


def test_the_watch_warns_once_the_moment_the_mean_passes_the_limit(capsys):
    w = LatenessWatch("kv_aware @ 8", 0.01, 0.1, {"b": {"lateness_sum": 1.0, "lateness_steps": 100}})
    w.on_scrape({"b": {"lateness_sum": 1.0 + 30 * 0.0005, "lateness_steps": 130}})  # 5 emulated ms: fine
    assert w.warned == [] and capsys.readouterr().err == ""
    w.on_scrape({"b": {"lateness_sum": 1.0 + 60 * 0.002, "lateness_steps": 160}})  # 20 ms
    w.on_scrape({"b": {"lateness_sum": 1.0 + 90 * 0.003, "lateness_steps": 190}})
    err = capsys.readouterr().err
    assert err.count("warning: kv_aware @ 8: engine steps 20.0 ms late on average") == 1 and len(w.warned) == 1


def test_under_json_logs_the_watch_warns_as_one_json_object():
    """--log-format json: the lateness warning goes through the log stack like every other warning (a
    container's log collector reads one JSON object a line), not as a console line."""
    import io
    import logging

    from kvblocks.logs import configure_logging

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("json", "warning", stream)
        w = LatenessWatch("kv_aware @ 8", 0.01, 0.1, {"b": {"lateness_sum": 1.0, "lateness_steps": 100}}, "json")
        w.on_scrape({"b": {"lateness_sum": 1.0 + 60 * 0.002, "lateness_steps": 160}})  # 20 emulated ms
        w.on_scrape({"b": {"lateness_sum": 1.0 + 90 * 0.003, "lateness_steps": 190}})
    finally:
        root.handlers, root.level = saved
        structlog.reset_defaults()
    lines = [ln for ln in stream.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    obj = json.loads(lines[0])
    assert obj["level"] == "warning" and obj["run"] == "kv_aware @ 8" and obj["lateness_limit_ms"] == 10
    assert obj["reason"] == "engine steps 20.0 ms late on average" and w.warned == [obj["reason"]]


async def test_a_machine_bound_run_is_marked_invalid_in_summary_report_and_console(tmp_path, capsys):
    """At 50x speed the emulators' steps run microseconds late at the least: a 1-ns limit always trips,
    a 1000-s one never does."""
    em = await start_emulator(EmulatorConfig(port=0, time_scale=FAST, log_requests=False))
    try:
        argv = ["run", "--target", em.url + "/v1", "--backend", em.url, "--rate", "40", "--out", str(tmp_path), *RAG]
        ns, cfg = check_args([*argv, "--lateness-limit", "1e-9"])
        await _run(ns, cfg, "test")
        out, err = capsys.readouterr()
        s = json.loads((tmp_path / "summary.json").read_text())
        assert s["invalid"].startswith("machine-bound: engine steps")
        assert "warning: rag: engine steps" in err and "not valid as a routing measurement: machine-bound" in out
        assert "**Invalid as a routing measurement**: machine-bound" in (tmp_path / "report.md").read_text()
        ns, cfg = check_args([*argv, "--lateness-limit", "1000"])
        await _run(ns, cfg, "test")
        assert json.loads((tmp_path / "summary.json").read_text())["invalid"] is None
    finally:
        await em.stop()


async def test_sweep_table_marks_a_machine_bound_strategy(tmp_path: Path):
    wl = WorkloadConfig(name="burst", requests=8, output_tokens=4, burst=4, burst_prefixes=1,
                        burst_prefix_tokens=64, burst_suffix_tokens=16)
    for limit, folder in ((1e-9, "starved"), (1000.0, "fine")):
        cfg = RunConfig(time_scale=FAST, progress=False, metrics_interval=0.05, out=str(tmp_path / folder),
                        workload=wl, lateness_limit=limit)
        await sweep(cfg, ["kv_aware", "round_robin"], [8.0], spawn="inprocess", backends=2,
                    slo=SLO(ttft_p99=1e9, tpot_p50=1e9))
    starved = sweep_table([tmp_path / "starved"])
    assert "| **8** ⚠ 1 invalid point | **8** ⚠ 1 invalid point |" in starved[2], starved
    assert starved[-1].startswith("⚠ invalid point: the emulators' steps")
    assert "| no | **no**: machine-bound" not in (tmp_path / "fine" / "report.md").read_text()
    assert "**no**: machine-bound: engine steps" in (tmp_path / "starved" / "report.md").read_text()
    assert not any("⚠" in line for line in sweep_table([tmp_path / "fine"]))
