"""CLI: `python -m loadgen run ...` (one workload, one target) and `python -m loadgen compare ...` (per strategy)."""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from .config import WORKLOAD_NAMES, RunConfig, WorkloadConfig, env_overrides


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    d = WorkloadConfig(**env_overrides(WorkloadConfig))
    g = p.add_argument_group("workload (env KVROUTE_LOADGEN_<NAME>)")
    g.add_argument("--workload", dest="name", choices=WORKLOAD_NAMES, default=d.name)
    g.add_argument("--seed", type=int, default=d.seed, help="fixes every prompt's text (default %(default)s)")
    g.add_argument("--requests", type=int, default=d.requests, help="requests to send (default %(default)s)")
    g.add_argument("--output-tokens", type=int, default=d.output_tokens, help="max_tokens, with ignore_eos")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len, help="prompt + output limit (default 4096)")
    g.add_argument("--documents", type=int, default=d.documents, help="rag: number of documents")
    g.add_argument("--doc-tokens-min", type=int, default=d.doc_tokens_min, help="rag: smallest document (tokens)")
    g.add_argument("--doc-tokens-max", type=int, default=d.doc_tokens_max, help="rag: largest document (tokens)")
    g.add_argument("--zipf-s", type=float, default=d.zipf_s, help="rag: Zipf exponent of document popularity")
    g.add_argument("--question-tokens", type=int, default=d.question_tokens, help="tokens of each new question")
    g.add_argument("--sessions", type=int, default=d.sessions, help="multiturn: sessions (0 = requests / turns)")
    g.add_argument("--turns", type=int, default=d.turns, help="multiturn: turns per session")
    g.add_argument("--turn-tokens", type=int, default=d.turn_tokens, help="multiturn: tokens per user message")
    g.add_argument("--think-time", type=float, default=d.think_time, help="multiturn: emulated s between turns")
    g.add_argument("--system-prompts", type=int, default=d.system_prompts, help="sysprompt: shared system prompts")
    g.add_argument("--system-tokens", type=int, default=d.system_tokens, help="sysprompt: tokens per system prompt")
    g.add_argument("--few-shot", type=int, default=d.few_shot, help="sysprompt: few-shot example pairs")
    g.add_argument("--prefix-lengths", default=",".join(map(str, d.prefix_lengths)),
                   help="prefix-sweep: comma-separated shared prefix lengths (tokens)")
    g.add_argument("--tenants", type=int, default=d.tenants, help="tenants: number of tenants")
    g.add_argument("--tenant-tokens", type=int, default=d.tenant_tokens, help="tenants: shared context tokens")
    g.add_argument("--users-per-tenant", type=int, default=d.users_per_tenant, help="tenants: users per tenant")
    g.add_argument("--burst", type=int, default=d.burst,
                   help="with --rate: requests arriving together per burst (0 = 8 for the burst workload, else 1)")
    g.add_argument("--burst-prefixes", type=int, default=d.burst_prefixes, help="burst: shared prefixes")
    g.add_argument("--burst-prefix-tokens", type=int, default=d.burst_prefix_tokens, help="burst: tokens per prefix")
    g.add_argument("--burst-suffix-tokens", type=int, default=d.burst_suffix_tokens, help="burst: unique tokens per request")
    g.add_argument("--mixed-rag", type=float, default=d.mixed_rag, help="mixed: share of rag requests")
    g.add_argument("--mixed-chat", type=float, default=d.mixed_chat, help="mixed: share of chat turns (rest: unique prompts)")
    g.add_argument("--trace-path", default=d.trace_path, help="trace: Mooncake JSONL file")
    g.add_argument("--trace-offset", type=int, default=d.trace_offset, help="trace: first line to replay")
    g.add_argument("--trace-speedup", type=float, default=d.trace_speedup, help="trace: timestamp speed-up factor")
    g.add_argument("--trace-max-output", type=int, default=d.trace_max_output, help="trace: cap output lengths (0 = none)")


def _add_run_args(p: argparse.ArgumentParser, target_required: bool) -> None:
    d = RunConfig(**env_overrides(RunConfig))
    g = p.add_argument_group("run (env KVROUTE_LOADGEN_<NAME>)")
    g.add_argument("--target", default=None if not target_required else d.target,
                   help="OpenAI base URL of the proxy, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--out", default=d.out, help="results folder (default %(default)s)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=d.rate, help="Poisson arrivals per emulated second (of requests; of sessions for multiturn)")
    mode.add_argument("--concurrency", type=int, default=d.concurrency, help="closed loop: requests (multiturn: sessions) in flight")
    g.add_argument("--duration", type=float, default=d.duration, help="stop sending after this many wall seconds")
    g.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="the emulators' --time-scale: wall s per emulated s (0.1 = 10x faster); "
                        "latencies are also reported divided by it, in emulated seconds")
    g.add_argument("--model", default=d.model, help="model name (default: first of GET /v1/models)")
    g.add_argument("--api-key", default=d.api_key)
    g.add_argument("--admin-key", default=d.admin_key, help="the proxy's admin key, if it has one")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, help="per request, wall seconds")
    g.add_argument("--metrics-interval", type=float, default=d.metrics_interval,
                   help="wall seconds between scrapes of the backends' /metrics")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="send one workload to one target")
    _add_workload_args(run)
    _add_run_args(run, target_required=True)
    run.add_argument("--backend", action="append", default=[],
                     help="a backend URL whose /metrics to sample (default: the proxy's /admin/backends if any)")
    cmp_ = sub.add_parser("compare", help="the same workload once per routing strategy against one proxy")
    _add_workload_args(cmp_)
    _add_run_args(cmp_, target_required=False)
    cmp_.add_argument("--strategies", default="default,round_robin,least_loaded",
                      help="comma-separated strategy names; 'default' = the proxy's current strategy")
    cmp_.add_argument("--backends", type=int, default=4, help="embedded emulators when no --target is given")
    cmp_.add_argument("--spawn", choices=("subprocess", "inprocess"), default="subprocess",
                      help="without --target: run the started proxy in its own process (default) or in this one")
    sw = sub.add_parser("sweep", help="every strategy at every offered load: latency vs load, goodput within an SLO")
    _add_workload_args(sw)
    _add_run_args(sw, target_required=False)
    sw.add_argument("--strategies", default="default,sglang,round_robin,least_loaded",
                    help="comma-separated; the first is the one whose regret is reported ('default' = the proxy's)")
    sw.add_argument("--rates", required=True,
                    help="comma-separated offered loads, req/s emulated (trace: speed-ups); replaces --rate")
    sw.add_argument("--slo-ttft-p99", type=float, default=2.0, help="goodput SLO: TTFT p99, emulated s")
    sw.add_argument("--slo-tpot-p50", type=float, default=0.05, help="goodput SLO: TPOT p50, emulated s")
    sw.add_argument("--seeds", default="", help="comma-separated seeds to repeat every point with (default: --seed)")
    sw.add_argument("--max-lateness", type=float, default=0.0,
                    help="rerun once a point whose emulator steps ran later than this on average (emulated s; 0 = never)")
    sw.add_argument("--keep-records", action="store_true", help="also write every point's per-request records")
    sw.add_argument("--backends", type=int, default=4, help="embedded emulators when no --target is given")
    sw.add_argument("--spawn", choices=("subprocess", "inprocess"), default="subprocess",
                    help="without --target: run the started proxy in its own process (default) or in this one")
    tab = sub.add_parser("sweep-table", help="markdown table of goodput and regret from sweep folders")
    tab.add_argument("folders", nargs="+", help="folders holding a sweep.json")
    return parser.parse_args(argv)


def configs(ns: argparse.Namespace) -> RunConfig:
    wl = {f.name: getattr(ns, f.name) for f in fields(WorkloadConfig) if hasattr(ns, f.name)}
    wl["prefix_lengths"] = tuple(int(x) for x in str(ns.prefix_lengths).split(",") if x.strip())
    run = {f.name: getattr(ns, f.name) for f in fields(RunConfig) if hasattr(ns, f.name) and f.name != "workload"}
    run["target"] = ns.target or ""
    run["progress"] = not ns.no_progress
    return RunConfig(**run, workload=WorkloadConfig(**wl))


async def _run(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .plots import run_plots
    from .proxy_admin import ProxyAdmin
    from .report import run_report
    from .results import SUMMARY_JSON, write_json, write_records
    from .runner import run_workload
    from .summary import summarize
    from .workloads import build_workload

    backends = list(ns.backend)
    if not backends:
        try:
            backends = await ProxyAdmin(cfg.target, cfg.admin_key).backends()
        except Exception:
            backends = []
    result = await run_workload(build_workload(cfg.workload), cfg, backends)
    out = Path(cfg.out)
    write_records(out, result)
    summary = summarize(result)
    write_json(out / SUMMARY_JSON, summary)
    report = run_report(summary, command, cfg.target, run_plots(result, out), out)
    print(f"hit rate {summary['hit_rate']:.1%}, TTFT p50 {_s(summary['ttft_p50_emulated'])} / "
          f"p99 {_s(summary['ttft_p99_emulated'])} emulated s, {summary['ok']} ok, {summary['errors']} errors"
          f"{', interrupted' if result.interrupted else ''}; report: {report}")
    return 130 if result.interrupted else 0


async def _compare(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .compare import compare
    from .report import compare_table

    strategies = [s.strip() for s in ns.strategies.split(",") if s.strip()]
    res = await compare(cfg, strategies, ns.target, command, ns.backends, ns.spawn)
    print("\n".join(compare_table(res.summaries)))
    print(f"report: {res.report}")
    return 130 if any(r.interrupted for r in res.results.values()) else 0


async def _sweep(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .sweep import SLO, sweep

    strategies = [s.strip() for s in ns.strategies.split(",") if s.strip()]
    rates = [float(x) for x in ns.rates.split(",") if x.strip()]
    seeds = [int(x) for x in ns.seeds.split(",") if x.strip()] or None
    if not rates or min(rates) <= 0:
        print("error: --rates needs positive values", file=sys.stderr)
        return 2
    res = await sweep(cfg, strategies, rates, ns.target, command, ns.backends, ns.spawn,
                      SLO(ns.slo_ttft_p99, ns.slo_tpot_p50), seeds, ns.keep_records, ns.max_lateness)
    print("goodput: " + ", ".join(f"{n} {g:g}" for n, g in res.goodput.items()))
    print(f"report: {res.report}")
    return 0


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = parse_args(argv)
    if ns.command == "sweep-table":
        from .sweep import sweep_table

        print("\n".join(sweep_table([Path(f) for f in ns.folders])))
        return 0
    try:
        cfg = configs(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m loadgen " + shlex.join(argv)
    from .peer import ModelUnknown

    runner = {"run": _run, "compare": _compare, "sweep": _sweep}[ns.command]
    try:
        return asyncio.run(runner(ns, cfg, command))
    except ModelUnknown as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
