"""CLI: `python -m loadgen run ...` (one workload, one target), `compare` (the workload once per strategy),
`sweep` (every strategy at every offered load: goodput and regret) and `sweep-table` (sweeps as one table).

Without --rate or --concurrency the load is one request at a time (concurrency 1), and --time-scale 1
means the backends run in real GPU time: a 200-request run then takes minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from kvblocks.cli import ArgumentParser, UsageError, error_for, exit_on_usage_error, http_url
from kvblocks.logs import configure_logging

from .config import ENV_PREFIX, WORKLOAD_NAMES, RunConfig, WorkloadConfig, env_overrides
from .validity import too_many_errors

PROG = "python -m loadgen"
# Exit status when a run finished but too many of its requests failed (see --max-error-share).
EXIT_TOO_MANY_ERRORS = 1
EXIT_INTERRUPTED = 130
DEFAULT_STRATEGIES = "default,round_robin,least_loaded"


def _env_defaults(cls: type):
    """`cls` with its `KVROUTE_LOADGEN_<FIELD>` env vars applied: the flags' defaults; a bad one names its variable."""
    values = env_overrides(cls)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        sources = {k: f"{ENV_PREFIX}{k.upper()}={os.environ[ENV_PREFIX + k.upper()]!r}" for k in values}
        raise error_for(e, [f.name for f in fields(cls)], sources, _ALIASES) from None


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    d = _env_defaults(WorkloadConfig)
    g = p.add_argument_group("workload (env KVROUTE_LOADGEN_<NAME>)")
    g.add_argument("--workload", dest="name", choices=WORKLOAD_NAMES, default=d.name,
                   help="what the requests look like (see docs/loadgen.md); default %(default)s")
    g.add_argument("--seed", type=int, default=d.seed, help="fixes every prompt's text (default %(default)s)")
    g.add_argument("--requests", type=int, default=d.requests, help="requests to send (default %(default)s)")
    g.add_argument("--output-tokens", type=int, default=d.output_tokens, help="max_tokens, with ignore_eos (default %(default)s)")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len, help="prompt + output limit (default 4096)")
    g.add_argument("--documents", type=int, default=d.documents, help="rag: number of documents (default %(default)s)")
    g.add_argument("--doc-tokens-min", type=int, default=d.doc_tokens_min, help="rag: smallest document (tokens) (default %(default)s)")
    g.add_argument("--doc-tokens-max", type=int, default=d.doc_tokens_max, help="rag: largest document (tokens) (default %(default)s)")
    g.add_argument("--zipf-s", type=float, default=d.zipf_s, help="rag: Zipf exponent of document popularity (default %(default)s)")
    g.add_argument("--question-tokens", type=int, default=d.question_tokens, help="tokens of each new question (default %(default)s)")
    g.add_argument("--sessions", type=int, default=d.sessions, help="multiturn: sessions (0 = requests / turns) (default %(default)s)")
    g.add_argument("--turns", type=int, default=d.turns, help="multiturn: turns per session (default %(default)s)")
    g.add_argument("--turn-tokens", type=int, default=d.turn_tokens, help="multiturn: tokens per user message (default %(default)s)")
    g.add_argument("--think-time", type=float, default=d.think_time, help="multiturn: emulated s between turns (default %(default)s)")
    g.add_argument("--system-prompts", type=int, default=d.system_prompts, help="sysprompt: shared system prompts (default %(default)s)")
    g.add_argument("--system-tokens", type=int, default=d.system_tokens, help="sysprompt: tokens per system prompt (default %(default)s)")
    g.add_argument("--few-shot", type=int, default=d.few_shot, help="sysprompt: few-shot example pairs (default %(default)s)")
    g.add_argument("--prefix-lengths", default=",".join(map(str, d.prefix_lengths)),
                   help="prefix-sweep: comma-separated shared prefix lengths (tokens) (default %(default)s)")
    g.add_argument("--tenants", type=int, default=d.tenants, help="tenants: number of tenants (default %(default)s)")
    g.add_argument("--tenant-tokens", type=int, default=d.tenant_tokens, help="tenants: shared context tokens (default %(default)s)")
    g.add_argument("--users-per-tenant", type=int, default=d.users_per_tenant, help="tenants: users per tenant (default %(default)s)")
    g.add_argument("--burst", type=int, default=d.burst,
                   help="with --rate: requests arriving together per burst (0 = 8 for the burst workload, else 1) (default %(default)s)")
    g.add_argument("--burst-prefixes", type=int, default=d.burst_prefixes, help="burst: shared prefixes (default %(default)s)")
    g.add_argument("--burst-prefix-tokens", type=int, default=d.burst_prefix_tokens, help="burst: tokens per prefix (default %(default)s)")
    g.add_argument("--burst-suffix-tokens", type=int, default=d.burst_suffix_tokens, help="burst: unique tokens per request (default %(default)s)")
    g.add_argument("--mixed-rag", type=float, default=d.mixed_rag, help="mixed: share of rag requests (default %(default)s)")
    g.add_argument("--mixed-chat", type=float, default=d.mixed_chat, help="mixed: share of chat turns, the rest unique prompts (default %(default)s)")
    g.add_argument("--rotate-prefix-tokens", type=int, default=d.rotate_prefix_tokens,
                   help="rotating-prefix: tokens of the shared prefix (default %(default)s)")
    g.add_argument("--rotate-after", type=int, default=d.rotate_after,
                   help="rotating-prefix: requests on one prefix before the next replaces it (default %(default)s)")
    g.add_argument("--rotate-suffix-tokens", type=int, default=d.rotate_suffix_tokens,
                   help="rotating-prefix: unique tokens per request (default %(default)s)")
    g.add_argument("--adapters", type=int, default=d.adapters, help="lora: adapters, named LORA_PREFIX0.. (default %(default)s)")
    g.add_argument("--lora-prefix", default=d.lora_prefix, help="lora: adapter name prefix (default %(default)s)")
    g.add_argument("--base-tokens", type=int, default=d.base_tokens, help="lora: tokens of the shared base preamble (default %(default)s)")
    g.add_argument("--models", default=",".join(d.models),
                   help="multimodel: comma-separated model names the requests pick from (default: none)")
    g.add_argument("--b2b-customers", type=int, default=d.b2b_customers,
                   help="b2b-saas: customers, each with its own shared context (default %(default)s)")
    g.add_argument("--b2b-context-tokens", type=int, default=d.b2b_context_tokens,
                   help="b2b-saas: tokens of a customer's shared context (default %(default)s)")
    g.add_argument("--b2b-users", type=int, default=d.b2b_users,
                   help="b2b-saas: users per customer, each with a fixed question (default %(default)s)")
    g.add_argument("--b2b-question-tokens", type=int, default=d.b2b_question_tokens,
                   help="b2b-saas: tokens of a user's question (default %(default)s)")
    g.add_argument("--b2b-output-tokens", type=int, default=d.b2b_output_tokens,
                   help="b2b-saas: max_tokens, with ignore_eos (default %(default)s)")
    g.add_argument("--b2b-stages", default=d.b2b_stages,
                   help="b2b-saas: Poisson arrival stages RATE:SECONDS,... used without --rate/--concurrency "
                        "(default: llm-d's warm-up and 3 -> 60 QPS ladder, %(default)s)")
    g.add_argument("--b2b-stage-scale", type=float, default=d.b2b_stage_scale,
                   help="b2b-saas: multiply every stage's duration (0.1 = same rates, a tenth of the requests) "
                        "(default %(default)s)")
    g.add_argument("--trace-path", default=d.trace_path,
                   help="trace: Mooncake JSONL file (default: the conversation trace shipped in loadgen/data/)")
    g.add_argument("--trace-offset", type=int, default=d.trace_offset, help="trace: first line to replay (default %(default)s)")
    g.add_argument("--trace-speedup", type=float, default=d.trace_speedup, help="trace: timestamp speed-up factor (default %(default)s)")
    g.add_argument("--trace-max-output", type=int, default=d.trace_max_output, help="trace: cap output lengths (0 = none) (default %(default)s)")


def _add_run_args(p: argparse.ArgumentParser, target_required: bool) -> None:
    d = _env_defaults(RunConfig)
    g = p.add_argument_group("run (env KVROUTE_LOADGEN_<NAME>)")
    g.add_argument("--target", default=None if not target_required else d.target,
                   help="OpenAI base URL of the proxy, ending in /v1 (default "
                        + (f"{d.target})" if target_required else "none: start a proxy with --backends emulators)"))
    if target_required:
        g.add_argument("--also-target", action="append", default=[u for u in d.also_targets.split(",") if u],
                       metavar="URL", help="another replica of the proxy (repeatable): requests are spread round robin "
                                           "over --target and these (default: none)")
    g.add_argument("--out", default=d.out, help="results folder (default %(default)s)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=d.rate,
                      help="Poisson arrivals per emulated second (of requests; of sessions for multiturn); "
                           "default %(default)s: neither this nor --concurrency = concurrency 1")
    mode.add_argument("--concurrency", type=int, default=d.concurrency,
                      help="closed loop: requests (multiturn: sessions) in flight; default %(default)s = 1 unless --rate")
    g.add_argument("--duration", type=float, default=d.duration,
                   help="stop sending after this many wall seconds (default %(default)s = no limit)")
    g.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="the emulators' --time-scale: wall s per emulated s (0.1 = 10x faster); "
                        "latencies are also reported divided by it, in emulated seconds; checked against the "
                        "emulators' own before the run (default %(default)s)")
    g.add_argument("--model", default=d.model, help="model name, checked against GET /v1/models "
                                                    "(default: the first model listed there)")
    g.add_argument("--api-key", default=d.api_key, help="client API key sent as Bearer (default %(default)s)")
    g.add_argument("--admin-key", default=d.admin_key, help="the proxy's admin key, if it has one (default: none)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="per request, wall seconds (default %(default)s)")
    g.add_argument("--metrics-interval", type=float, default=d.metrics_interval,
                   help="wall seconds between scrapes of the backends' /metrics (default %(default)s)")
    g.add_argument("--max-error-share", type=float, default=d.max_error_share,
                   help="exit with status 1 when more than this share of a run's requests failed "
                        "(default %(default)s)")
    g.add_argument("--lateness-limit", type=float, default=d.lateness_limit,
                   help="mark a run invalid (and say so on the console at once) when the emulators' engine steps, "
                        "or this load generator's arrivals, run later than this on average, in emulated s: the "
                        "machine, not the strategy, then sets the latencies (0 = never) (default %(default)s)")
    g.add_argument("--log-format", choices=("console", "json"), default=d.log_format,
                   help="warnings and errors as console lines or JSON objects (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def build_parser() -> argparse.ArgumentParser:
    from proxy.routing.policies import POLICIES

    parser = ArgumentParser(prog=PROG, description=__doc__,
                            epilog="Every flag is also the env var KVROUTE_LOADGEN_<FLAG_IN_UPPER_SNAKE>.")
    sub = parser.add_subparsers(dest="command", required=True)  # argparse lists every subcommand
    run = sub.add_parser("run", help="send one workload to one target", description=__doc__)
    _add_workload_args(run)
    _add_run_args(run, target_required=True)
    run.add_argument("--backend", action="append", default=[],
                     help="a backend URL whose /metrics to sample, repeatable (default: the proxy's /admin/backends if any)")
    cmp_ = sub.add_parser("compare", help="the same workload once per routing strategy against one proxy",
                          description=__doc__)
    _add_workload_args(cmp_)
    _add_run_args(cmp_, target_required=False)
    cmp_.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                      help="comma-separated strategy names, checked before any runs: 'default' (the proxy's current "
                           f"strategy), {', '.join(POLICIES)} (default %(default)s)")
    cmp_.add_argument("--backends", type=int, default=4, help="embedded emulators when no --target is given (default %(default)s)")
    cmp_.add_argument("--spawn", choices=("subprocess", "inprocess"), default="subprocess",
                      help="without --target: run the started proxy in its own process or in this one "
                           "(default %(default)s)")
    cmp_.add_argument("--reset-target", action="store_true",
                      help="allow resetting the prefix index and the backends' prefix caches of a --target this run "
                           "did not start (compare resets them between strategies; default: refuse)")
    sw = sub.add_parser("sweep", help="every strategy at every offered load: latency vs load, goodput within an SLO")
    _add_workload_args(sw)
    _add_run_args(sw, target_required=False)
    sw.add_argument("--strategies", default="default,sglang,round_robin,least_loaded",
                    help="comma-separated; the first is the one whose regret is reported ('default' = the proxy's) (default %(default)s)")
    sw.add_argument("--rates", required=True,
                    help="comma-separated offered loads, req/s emulated (trace: speed-ups); replaces --rate (required, no default)")
    sw.add_argument("--slo-ttft-p99", type=float, default=2.0, help="goodput SLO: TTFT p99, emulated s (default %(default)s)")
    sw.add_argument("--slo-tpot-p50", type=float, default=0.05, help="goodput SLO: TPOT p50, emulated s (default %(default)s)")
    sw.add_argument("--seeds", default="", help="comma-separated seeds to repeat every point with (default: --seed)")
    sw.add_argument("--max-lateness", type=float, default=0.0,
                    help="rerun once a point whose emulator steps ran later than this on average (emulated s; 0 = never) (default %(default)s)")
    sw.add_argument("--keep-records", action="store_true", help="also write every point's per-request records (default: off)")
    sw.add_argument("--backends", type=int, default=4, help="embedded emulators when no --target is given (default %(default)s)")
    sw.add_argument("--spawn", choices=("subprocess", "inprocess"), default="subprocess",
                    help="without --target: run the started proxy in its own process or in this one (default %(default)s)")
    sw.add_argument("--peer", default="",
                    help="the --target is another router (sglang-router, vllm-router, ...): run it as the one "
                         "strategy under this name, resetting the --backend caches between points (default: none)")
    sw.add_argument("--backend", action="append", default=[],
                    help="with --peer: a backend URL behind the router, repeatable; its /metrics are sampled and "
                         "its prefix cache reset between points (default: none)")
    sw.add_argument("--reset-target", action="store_true",
                    help="allow resetting the prefix index and the backends' prefix caches of a --target this run "
                         "did not start (the sweep resets them between points; default: refuse)")
    from .simulate_cli import add_simulate_parser

    add_simulate_parser(sub, _add_workload_args, __doc__)
    tab = sub.add_parser("sweep-table", help="markdown table of goodput and regret from sweep folders")
    tab.add_argument("folders", nargs="+", help="folders holding a sweep.json")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


_ALIASES = {"name": "workload"}


def configs(ns: argparse.Namespace) -> RunConfig:
    """The run's settings from parsed flags; a bad value is a UsageError naming its flag."""
    names = [f.name for f in fields(WorkloadConfig)] + [f.name for f in fields(RunConfig)]
    wl = {f.name: getattr(ns, f.name) for f in fields(WorkloadConfig) if hasattr(ns, f.name)}
    try:
        wl["prefix_lengths"] = tuple(int(x) for x in str(ns.prefix_lengths).split(",") if x.strip())
    except ValueError:
        raise UsageError("--prefix-lengths", f"{ns.prefix_lengths!r}: expected comma-separated integers") from None
    if hasattr(ns, "models"):
        wl["models"] = tuple(x.strip() for x in str(ns.models).split(",") if x.strip())
    run = {f.name: getattr(ns, f.name) for f in fields(RunConfig) if hasattr(ns, f.name) and f.name != "workload"}
    run["target"] = http_url("--target", ns.target) if ns.target else ""
    run["also_targets"] = ",".join(http_url("--also-target", u) for u in getattr(ns, "also_target", None) or [])
    run["progress"] = not ns.no_progress
    for url in getattr(ns, "backend", []):
        http_url("--backend", url)
    try:
        return RunConfig(**run, workload=WorkloadConfig(**wl))
    except (TypeError, ValueError) as e:
        raise error_for(e, names, {}, _ALIASES) from None


def strategy_names(text: str) -> list[str]:
    """--strategies as a list, each a known policy or 'default'; checked before anything runs."""
    from proxy.routing.policies import POLICIES

    from .compare import DEFAULT_ALIAS

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--strategies", "no strategy given")
    unknown = [n for n in names if n != DEFAULT_ALIAS and n not in POLICIES]
    if unknown:
        raise UsageError("--strategies", f"unknown strategy {', '.join(map(repr, unknown))}; "
                         f"choose from {DEFAULT_ALIAS}, {', '.join(POLICIES)}")
    return names


async def _run(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .plots import run_plots
    from .proxy_admin import ProxyAdmin
    from .report import run_report
    from .results import SUMMARY_JSON, write_json, write_records
    from .runner import run_workload
    from .summary import summarize
    from .workloads import build_workload

    from .preflight import check_target, preflight

    backends = list(ns.backend)
    if not backends:
        try:
            backends = await ProxyAdmin(cfg.target, cfg.admin_key).backends()
        except Exception:
            backends = []
    cfg.model = (await preflight(cfg.target, cfg.model, cfg.api_key, cfg.time_scale, backends)).model
    for url in cfg.targets()[1:]:
        try:
            await check_target(url, cfg.model, cfg.api_key)
        except UsageError as e:
            raise UsageError("--also-target", e.message) from None
    result = await run_workload(build_workload(cfg.workload), cfg, backends)
    out = Path(cfg.out)
    write_records(out, result)
    summary = summarize(result)
    write_json(out / SUMMARY_JSON, summary)
    report = run_report(summary, command, cfg.target, run_plots(result, out), out)
    print(f"hit rate {summary['hit_rate']:.1%}, TTFT p50 {_s(summary['ttft_p50_emulated'])} / "
          f"p99 {_s(summary['ttft_p99_emulated'])} emulated s, {summary['ok']} ok, {summary['errors']} errors"
          f"{', interrupted' if result.interrupted else ''}; report: {report}")
    if summary.get("invalid"):
        print(f"not valid as a routing measurement: {summary['invalid']}")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return _error_exit({cfg.workload.name: summary}, cfg.max_error_share)


def _error_exit(summaries: dict[str, dict], max_share: float) -> int:
    bad = too_many_errors(summaries, max_share)
    for line in bad:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    return EXIT_TOO_MANY_ERRORS if bad else 0


async def _compare(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .compare import compare
    from .report import compare_table

    strategies = strategy_names(ns.strategies)
    await _reachable(cfg)
    res = await compare(cfg, strategies, cfg.target or None, command, ns.backends, ns.spawn)
    print("\n".join(compare_table(res.summaries)))
    for name, s in res.summaries.items():
        if s.get("invalid"):
            print(f"not valid as a routing measurement: {name}: {s['invalid']}")
    print(f"report: {res.report}")
    if any(r.interrupted for r in res.results.values()):
        return EXIT_INTERRUPTED
    return _error_exit(res.summaries, cfg.max_error_share)


async def _reachable(cfg: RunConfig) -> None:
    """A --target that does not answer /v1/models is a UsageError naming it, before anything runs."""
    if cfg.target:
        from .preflight import check_target

        await check_target(cfg.target, "", cfg.api_key)


async def _sweep(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .sweep import SLO, PeerRouter, invalid_points, sweep, verdict_text

    strategies = [s.strip() for s in ns.strategies.split(",") if s.strip()]
    rates, seeds = ns.rate_list, ns.seed_list  # checked by check_args
    await _reachable(cfg)
    peer = PeerRouter(ns.peer, list(ns.backend)) if ns.peer else None
    res = await sweep(cfg, strategies, rates, ns.target, command, ns.backends, ns.spawn,
                      SLO(ns.slo_ttft_p99, ns.slo_tpot_p50), seeds, ns.keep_records, ns.max_lateness, peer)
    unit = "x" if cfg.workload.name == "trace" else " req/s"
    print("goodput: " + ", ".join(f"{n} {g:g}{unit}" for n, g in res.goodput.items()))
    if res.goodput_verdict:
        v = res.goodput_verdict
        print(f"{v['subject']}'s goodput: {verdict_text(v, unit)}")
    for line in invalid_points(res.points):
        print(f"not valid (machine-bound): {line}")
    print(f"report: {res.report}")
    for line in res.failed_points:
        print(f"{PROG}: error: point {line}", file=sys.stderr)
    return EXIT_TOO_MANY_ERRORS if res.failed_points else 0


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def check_args(argv: list[str]) -> tuple[argparse.Namespace, RunConfig | None]:
    """Everything that can be checked without a network: flags, values, files, strategy names (UsageError)."""
    ns = parse_args(argv)
    if ns.command == "sweep-table":
        for folder in ns.folders:
            if not (Path(folder) / "sweep.json").is_file():
                raise UsageError("folders", f"{folder}: no sweep.json (a `python -m loadgen sweep --out` folder)")
        return ns, None
    cfg = configs(ns)
    check_trace_flags(ns, cfg)
    if ns.command == "simulate":
        from .simulate_cli import check

        check(ns, cfg)
        return ns, cfg
    if ns.command == "sweep":
        sweep_values(ns)
    if ns.command == "sweep" and (ns.peer or ns.backend):
        if not ns.peer:
            raise UsageError("--backend", "is for --peer sweeps (a proxy's backends come from its admin API)")
        if not ns.target:
            raise UsageError("--peer", "needs --target, the other router's OpenAI base URL")
        if not ns.backend:
            raise UsageError("--peer", "needs --backend URL (repeatable): the backends whose caches to reset")
        if "/" in ns.peer or ns.peer in ("", ".", ".."):
            raise UsageError("--peer", f"{ns.peer!r}: a name for the reports' folders, without '/'")
    if ns.command in ("compare", "sweep"):
        if not (ns.command == "sweep" and ns.peer):
            strategy_names(ns.strategies)
        if ns.backends < 1:
            raise UsageError("--backends", f"must be >= 1 (got {ns.backends})")
        if ns.target and not ns.reset_target:
            what = ("the prefix caches of every --backend" if ns.command == "sweep" and ns.peer else
                    f"the prefix index of {cfg.target} and its backends' prefix caches")
            raise UsageError("--target", f"{ns.command} resets {what} between runs; pass --reset-target to allow "
                             "that on servers this run did not start")
    return ns, cfg


TRACE_FLAGS = ("trace_path", "trace_offset", "trace_speedup", "trace_max_output")


def check_trace_flags(ns: argparse.Namespace, cfg: RunConfig) -> None:
    """The trace file is read through before anything runs (a bad line is named, an empty file is an
    error), and the trace's flags are refused with another workload rather than silently ignored."""
    from .trace import TraceError, check_trace

    wl = cfg.workload
    if wl.name != "trace":
        defaults = WorkloadConfig()
        given = [f for f in TRACE_FLAGS if getattr(wl, f) != getattr(defaults, f)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(flag, f"is for --workload trace; the workload is {wl.name!r} "
                             f"(pass --workload trace, or drop {flag})")
        return
    try:
        n = check_trace(wl.trace_path)
    except TraceError as e:
        raise UsageError("--trace-path", str(e)) from None
    except OSError as e:
        raise UsageError("--trace-path", f"{wl.trace_path}: {e.strerror or e}") from None
    if wl.trace_offset >= n:
        raise UsageError("--trace-offset", f"{wl.trace_offset} is past the last line of {wl.trace_path} "
                         f"({n} records)")


def sweep_values(ns: argparse.Namespace) -> None:
    """--rates and --seeds as numbers (UsageError naming the flag), stored back on `ns` as lists."""
    try:
        ns.rate_list = [float(x) for x in ns.rates.split(",") if x.strip()]
    except ValueError:
        raise UsageError("--rates", f"{ns.rates!r}: expected comma-separated numbers, e.g. 4,8,16") from None
    if not ns.rate_list or min(ns.rate_list) <= 0:
        raise UsageError("--rates", f"{ns.rates!r}: expected positive numbers")
    try:
        ns.seed_list = [int(x) for x in ns.seeds.split(",") if x.strip()] or None
    except ValueError:
        raise UsageError("--seeds", f"{ns.seeds!r}: expected comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .peer import ModelUnknown
    from .proxy_admin import AdminError

    with exit_on_usage_error(PROG):
        ns, cfg = check_args(argv)
        if cfg is None:  # sweep-table: no run, only the sweeps' table
            from .sweep import sweep_table

            print("\n".join(sweep_table([Path(f) for f in ns.folders])))
            return 0
        # Results go to stdout and the report; warnings (ours, aiohttp's) through the shared log stack.
        configure_logging(cfg.log_format, "warning")
        command = "python -m loadgen " + shlex.join(argv)
        if ns.command == "simulate":  # its own virtual-time loop: not inside asyncio.run
            from .simulate_cli import run as simulate

            return simulate(ns, cfg, command)
        runner = {"run": _run, "compare": _compare, "sweep": _sweep}[ns.command]
        try:
            return asyncio.run(runner(ns, cfg, command))
        except ModelUnknown as e:
            print(f"python -m loadgen: error: {e}", file=sys.stderr)
            return 2
        except AdminError as e:  # the proxy's admin API, or a peer's backend, refused a reset or switch
            print(f"python -m loadgen: error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
