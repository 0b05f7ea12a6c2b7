"""`python -m loadgen simulate`: compare or sweep strategies on a simulated fleet (see `simulate.py`).

Without --sweep it writes what `compare` writes (OUT/<strategy>/summary.json, records.jsonl,
report.md, plots; OUT/report.md across strategies); with --sweep what `sweep` writes (sweep.json,
goodput and regret tables). Every figure is in emulated seconds and reproducible from the flags.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvblocks.cli import UsageError

from .config import RunConfig

DEFAULT_STRATEGIES = "default,round_robin,least_loaded"
SWEEP_STRATEGIES = "default,sglang,round_robin,least_loaded"


def add_simulate_parser(sub, add_workload_args, doc: str) -> argparse.ArgumentParser:
    from kvblocks.latency import PROFILES
    from emulator.model_spec import GPUS, MODELS
    from proxy.routing.policies import POLICIES

    p = sub.add_parser("simulate", help="strategies on N emulated backends in virtual time (no sockets, deterministic)",
                       description=__doc__)
    add_workload_args(p)
    g = p.add_argument_group("simulation")
    g.add_argument("--out", default="loadgen-results", help="results folder (default %(default)s)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=0.0,
                      help="Poisson arrivals per emulated second (default: neither this nor --concurrency = concurrency 1)")
    mode.add_argument("--concurrency", type=int, default=0, help="closed loop: requests (multiturn: sessions) in flight (default %(default)s)")
    g.add_argument("--duration", type=float, default=0.0, help="stop sending after this many emulated seconds (default %(default)s = no limit)")
    g.add_argument("--strategies", default=None,
                   help=f"comma-separated: 'default' (kv_aware, the proxy's default) or {', '.join(POLICIES)} "
                        f"(default {DEFAULT_STRATEGIES}; with --sweep {SWEEP_STRATEGIES})")
    g.add_argument("--seeds", default="", help="comma-separated workload seeds, each run separately (default: --seed)")
    g.add_argument("--backends", type=int, default=4, help="emulated backends (default %(default)s)")
    g.add_argument("--model", default=None, help=f"emulator model spec (KV cache size): {', '.join(MODELS)} (default: the emulator's)")
    g.add_argument("--gpu", default=None, choices=sorted(GPUS), help="emulator GPU spec (default: the emulator's)")
    g.add_argument("--profile", default=None, choices=sorted(PROFILES),
                   help="latency profile of the emulators and of the router's cost model (default: the emulator's)")
    g.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks per backend (default: from --model and --gpu)")
    g.add_argument("--kv-events", action="store_true",
                   help="the proxy follows every backend's KV events (exact index), as with --kv-events on python -m proxy (default: off, as python -m proxy without it)")
    g.add_argument("--policy-param", action="append", default=[], metavar="POLICY.NAME=VALUE",
                   help="a policy tunable, as python -m proxy --policy-param (repeatable; default: none)")
    g.add_argument("--model-backends", default="",
                   help="with --models: backends serving each of them, comma-separated in --models order, summing to "
                        "--backends (default: an even split, the first models taking the remainder; every model's "
                        "cache sized by --model)")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=None, metavar="NAME=PATH",
                   help="LoRA adapters the backends serve, as python -m emulator --lora-modules (default: with the "
                        "lora workload its adapters, LORA_PREFIXk=/adapters/LORA_PREFIXk; otherwise none)")
    g.add_argument("--lora-copies", type=int, default=None,
                   help="backends serving each adapter: adapter j on backends j..j+N-1 (default: every backend)")
    g.add_argument("--max-loras", type=int, default=1,
                   help="distinct adapters one backend runs in a step, as python -m emulator --max-loras (default %(default)s)")
    g.add_argument("--lora-load-s", type=float, default=0.0,
                   help="emulated s a step pays to bring an adapter into a slot, as python -m emulator --lora-load-s "
                        "(default %(default)s)")
    g.add_argument("--lora-runtime-load", action="store_true",
                   help="the proxy may send an adapter request to a backend without the adapter, loading it there "
                        "first, as python -m proxy --lora-runtime-load (every backend allows it; default: off)")
    g.add_argument("--overhead-ms", type=float, default=None,
                   help="emulated ms every request spends outside the engines (HTTP, proxy, tokenizing; a gateway's "
                        "floor): it reaches its engine this long after it is routed (default: 0; with --against-wall "
                        "measured on the real stack first)")
    g.add_argument("--metrics-interval", type=float, default=0.5,
                   help="emulated s between the load generator's samples of the backends' metrics (default %(default)s)")
    g.add_argument("--max-error-share", type=float, default=0.05,
                   help="exit 1 when more than this share of a run's requests failed (default %(default)s)")
    g.add_argument("--sweep", action="store_true", help="every strategy at every --rates load: goodput and regret tables (default: off, one run per strategy)")
    g.add_argument("--rates", default="", help="with --sweep: comma-separated offered loads, req/s emulated (trace: speed-ups); default: none")
    g.add_argument("--slo-ttft-p99", type=float, default=2.0, help="goodput SLO: TTFT p99, emulated s (default %(default)s)")
    g.add_argument("--slo-tpot-p50", type=float, default=0.05, help="goodput SLO: TPOT p50, emulated s (default %(default)s)")
    g.add_argument("--keep-records", action="store_true", help="with --sweep: also write every point's records (default: off)")
    g.add_argument("--reuse", default="",
                   help="with --sweep: comma-separated strategies whose points are read from OUT where a summary of the "
                        "same workload, load, seed and fleet is there (their code did not change), not simulated again "
                        "(default: none)")
    g.add_argument("--find-backends", action="store_true",
                   help="capacity planning: per strategy, the fewest backends (up to --max-backends) meeting "
                        "--slo-ttft-p99 and --slo-tpot-p50 with no failed request (OUT/capacity.json, table, plot; default: off)")
    g.add_argument("--max-backends", type=int, default=64, help="with --find-backends: the most to try (default %(default)s)")
    g.add_argument("--against-wall", action="store_true",
                   help="also run every strategy for real (python -m proxy with --backends embedded emulators, time "
                        "scale 1, OUT/wall) and print how far the simulation is from it (OUT/parity.json; default: off)")
    p.set_defaults(target=None, no_progress=True, log_format="console", time_scale=1.0)
    return p


def check(ns: argparse.Namespace, cfg: RunConfig) -> None:
    """Flag checks that need no run (UsageError naming the flag)."""
    from proxy.routing.policies import parse_policy_params

    from .__main__ import strategy_names

    if ns.strategies is None:
        ns.strategies = SWEEP_STRATEGIES if ns.sweep else DEFAULT_STRATEGIES
    strategy_names(ns.strategies)
    if ns.backends < 1:
        raise UsageError("--backends", f"must be >= 1 (got {ns.backends})")
    if ns.num_gpu_blocks is not None and ns.num_gpu_blocks < 2:
        raise UsageError("--num-gpu-blocks", f"must be >= 2 (got {ns.num_gpu_blocks})")
    seeds(ns)
    rates(ns)
    if ns.sweep and not ns.rates:
        raise UsageError("--rates", "--sweep needs --rates (comma-separated offered loads)")
    if ns.against_wall and (ns.sweep or ns.kv_events or ns.model or ns.gpu or ns.profile or ns.num_gpu_blocks
                            or ns.policy_param or cfg.workload.models or ns.lora_modules
                            or cfg.workload.name == "lora"):
        raise UsageError("--against-wall", "compares the proxy's default setup: no --sweep, --kv-events, --model, "
                         "--gpu, --profile, --num-gpu-blocks, --policy-param, --models, --lora-modules or lora "
                         "workload with it")
    fleet_shape(ns, cfg)
    if ns.find_backends and ns.sweep:
        raise UsageError("--find-backends", "plans one load (--rate or the trace's speed-up), not a --sweep")
    if ns.max_backends < 1:
        raise UsageError("--max-backends", f"must be >= 1 (got {ns.max_backends})")
    if ns.rates and not ns.sweep:
        raise UsageError("--rates", "is for --sweep (a single run takes --rate)")
    if ns.overhead_ms is not None and not ns.overhead_ms >= 0:
        raise UsageError("--overhead-ms", f"must be >= 0 (got {ns.overhead_ms})")
    if ns.reuse and not ns.sweep:
        raise UsageError("--reuse", "is for --sweep (it reads a sweep's points from OUT)")
    unknown = set(_names(ns.reuse)) - set(_names(ns.strategies))
    if unknown:
        raise UsageError("--reuse", f"{', '.join(sorted(unknown))} not in --strategies")
    try:
        parse_policy_params(ns.policy_param)
    except ValueError as e:
        raise UsageError("--policy-param", str(e)) from None
    from emulator.model_spec import MODELS

    if ns.model is not None and ns.model not in MODELS and ns.num_gpu_blocks is None:
        raise UsageError("--model", f"unknown model {ns.model!r}; choose one of {', '.join(MODELS)} or pass --num-gpu-blocks")
    try:
        fleet_spec(ns, cfg).emulator_config()
    except ValueError as e:
        raise UsageError("--max-model-len", str(e)) from None


def model_backends(ns: argparse.Namespace, cfg: RunConfig) -> list[int]:
    """--model-backends as counts, one per --models entry, summing to --backends ([] = even split)."""
    models = cfg.workload.models
    if not ns.model_backends:
        if len(models) > ns.backends:
            raise UsageError("--models", f"{len(models)} models need at least {len(models)} backends (--backends {ns.backends})")
        return []
    if not models:
        raise UsageError("--model-backends", "splits the fleet between --models; give --models A,B too")
    try:
        counts = [int(x) for x in ns.model_backends.split(",") if x.strip()]
    except ValueError:
        raise UsageError("--model-backends", f"{ns.model_backends!r}: expected comma-separated integers") from None
    if len(counts) != len(models) or min(counts) < 1 or sum(counts) != ns.backends:
        raise UsageError("--model-backends", f"needs one count >= 1 per model of --models ({len(models)}) summing to "
                         f"--backends ({ns.backends}); got {ns.model_backends!r}")
    if ns.find_backends:
        raise UsageError("--model-backends", "--find-backends varies the fleet size: leave the split even")
    return counts


def lora_modules(ns: argparse.Namespace, cfg: RunConfig) -> list[str]:
    """--lora-modules, checked; by default the lora workload's adapters (every name it sends is served)."""
    from emulator.lora import parse_lora_module

    wl = cfg.workload
    wanted = [f"{wl.lora_prefix}{k}" for k in range(wl.adapters)] if wl.name == "lora" else []
    if ns.lora_modules is None:
        return [f"{name}=/adapters/{name}" for name in wanted]
    names = []
    for spec in ns.lora_modules:
        try:
            names.append(parse_lora_module(spec)[0])
        except ValueError as e:
            raise UsageError("--lora-modules", str(e).replace("lora_modules entry", "entry")) from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError("--lora-modules", f"adapter {dup[0]!r} given twice")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UsageError("--lora-modules", f"the lora workload sends adapters no backend would serve: {', '.join(missing)}")
    return list(ns.lora_modules)


def fleet_shape(ns: argparse.Namespace, cfg: RunConfig) -> None:
    """Checks of the fleet-shape flags (models split, adapters)."""
    model_backends(ns, cfg)
    mods = lora_modules(ns, cfg)
    if ns.max_loras < 1:
        raise UsageError("--max-loras", f"must be >= 1 (got {ns.max_loras})")
    if ns.lora_load_s < 0:
        raise UsageError("--lora-load-s", f"must be >= 0 (got {ns.lora_load_s:g})")
    if ns.lora_copies is not None:
        if not mods:
            raise UsageError("--lora-copies", "places adapters: give --lora-modules (or the lora workload)")
        if not 1 <= ns.lora_copies <= ns.backends:
            raise UsageError("--lora-copies", f"must be within 1..--backends ({ns.backends}); got {ns.lora_copies}")
    if ns.lora_runtime_load and not mods:
        raise UsageError("--lora-runtime-load", "loads adapters: give --lora-modules (or the lora workload)")


def seeds(ns: argparse.Namespace) -> list[int]:
    try:
        return [int(x) for x in ns.seeds.split(",") if x.strip()] or [ns.seed]
    except ValueError:
        raise UsageError("--seeds", f"{ns.seeds!r}: expected comma-separated integers") from None


def rates(ns: argparse.Namespace) -> list[float]:
    try:
        out = [float(x) for x in ns.rates.split(",") if x.strip()]
    except ValueError:
        raise UsageError("--rates", f"{ns.rates!r}: expected comma-separated numbers") from None
    if any(r <= 0 for r in out):
        raise UsageError("--rates", "needs positive values")
    return out


def fleet_spec(ns: argparse.Namespace, cfg: RunConfig, backends: int | None = None):
    from .simulate import FleetSpec

    return FleetSpec(backends=backends or ns.backends, profile=ns.profile, model=ns.model, gpu=ns.gpu,
                     num_gpu_blocks=ns.num_gpu_blocks, max_model_len=cfg.workload.max_model_len,
                     kv_events=ns.kv_events, policy_params=list(ns.policy_param),
                     served_models=list(cfg.workload.models), model_backends=[] if backends else model_backends(ns, cfg),
                     lora_modules=lora_modules(ns, cfg), lora_copies=ns.lora_copies, max_loras=ns.max_loras,
                     lora_load_s=ns.lora_load_s, lora_runtime_load=ns.lora_runtime_load,
                     overhead_s=(ns.overhead_ms or 0.0) / 1000)


def describe(spec) -> str:
    emu = spec.emulator_config()
    served = (", ".join(f"{n}: {m}" for m, n in zip(spec.served_models, spec.backends_per_model()))
              + f" (each sized as {spec.model or 'the default model'})") if spec.served_models else emu.model
    lora = ""
    if spec.lora_modules:
        lora = (f", {len(spec.lora_modules)} LoRA adapters on {spec.lora_copies or spec.backends} backends each, "
                f"max_loras {spec.max_loras}, load {spec.lora_load_s:g} s"
                + (", loaded elsewhere at run time by the proxy" if spec.lora_runtime_load else ""))
    return (f"simulated in virtual time: the proxy's router over {spec.backends} emulated backends "
            f"({served} on {emu.gpu}, {emu.resolved_num_gpu_blocks} KV blocks, profile {emu.profile}{lora}"
            f"{', KV events followed' if spec.kv_events else ''}"
            f"{f', {spec.overhead_s * 1000:g} ms a request outside the engines' if spec.overhead_s else ''})")


def _stored_point(path: Path, name: str, rate: float, workload, seed: int, spec, fleet: str) -> dict | None:
    """A summary `--reuse` may stand in for a run: the same strategy, load, workload (params, seed,
    requests) and fleet (its description, or for summaries written before it was stored, its
    backend count); None when there is none or it differs, so the point is simulated."""
    from .results import read_json

    if not path.exists():
        return None
    s = read_json(path)
    same_fleet = s["fleet"] == fleet if "fleet" in s else len(s.get("per_backend") or {}) == spec.backends
    if (s.get("strategy") == name and s.get("offered_rate") == rate and s.get("workload") == workload.name
            and s.get("workload_params") == {**workload.params, "seed": seed}
            and s.get("requests_planned") == len(workload.requests) and same_fleet):
        return s
    return None


def _names(text: str) -> list[str]:
    from proxy.routing.policies import DEFAULT_POLICY

    from .compare import DEFAULT_ALIAS

    return [DEFAULT_POLICY if s.strip() == DEFAULT_ALIAS else s.strip() for s in text.split(",") if s.strip()]


def run(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    check(ns, cfg)
    wall0 = time.perf_counter()
    if ns.against_wall:
        code = against_wall(ns, cfg, command)
    elif ns.find_backends:
        code = find_backends(ns, cfg, command)
    else:
        code = _sweep(ns, cfg, command) if ns.sweep else _compare(ns, cfg, command)
    print(f"simulated in {time.perf_counter() - wall0:.1f} s wall", file=sys.stderr)
    return code


def _compare(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .__main__ import _error_exit
    from .compare import _safe
    from .plots import compare_plots, run_plots
    from .report import compare_report, compare_table, run_report
    from .results import SUMMARY_JSON, write_json, write_records
    from .simulate import simulate_run
    from .summary import summarize
    from .workloads import build_workload

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = fleet_spec(ns, cfg)
    where = describe(spec)
    seed_list = seeds(ns)
    summaries: dict[str, dict[str, Any]] = {}
    for seed in seed_list:
        c = replace(cfg, workload=replace(cfg.workload, seed=seed))
        workload = build_workload(c.workload)
        results, sums = {}, {}
        for name in _names(ns.strategies):
            result = simulate_run(workload, c, spec, name)
            s = summarize(result)
            s["strategy"], s["is_default"], s["simulated"] = name, name == _names("default")[0], True
            s["workload_params"] = {**s["workload_params"], "seed": seed}
            results[name], sums[name] = result, s
            folder = out / _safe(name) / (f"seed-{seed}" if len(seed_list) > 1 else "")
            write_records(folder, result)
            write_json(folder / SUMMARY_JSON, s)
            run_report(s, command, where, run_plots(result, folder), folder)
        sub = out if len(seed_list) == 1 else out / f"seed-{seed}"
        sub.mkdir(parents=True, exist_ok=True)
        write_json(sub / SUMMARY_JSON, sums)
        report = compare_report(sums, command, where, compare_plots(results, sums, sub), sub, [])
        if len(seed_list) > 1:
            print(f"seed {seed}:")
        print("\n".join(compare_table(sums)))
        print(f"report: {report}")
        summaries.update({f"{n}@{seed}" if len(seed_list) > 1 else n: s for n, s in sums.items()})
    return _error_exit(summaries, cfg.max_error_share)


def _sweep(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    from .compare import _safe
    from .results import SUMMARY_JSON, write_json, write_records
    from .simulate import simulate_run
    from .summary import summarize
    from .sweep import SLO, SweepResult, finish_sweep, point, verdict_text
    from .workloads import build_workload

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = fleet_spec(ns, cfg)
    slo = SLO(ns.slo_ttft_p99, ns.slo_tpot_p50)
    names = _names(ns.strategies)
    seed_list, rate_list = seeds(ns), rates(ns)
    is_trace = cfg.workload.name == "trace"
    fleet = describe(spec)
    res = SweepResult(target=fleet)
    reuse = set(_names(ns.reuse))
    reused = 0
    first = None
    for seed in seed_list:
        for rate in rate_list:
            wl = replace(cfg.workload, seed=seed, **({"trace_speedup": rate} if is_trace else {}))
            c = replace(cfg, rate=0.0 if is_trace else rate, concurrency=0, workload=wl)
            workload = build_workload(wl)
            for name in names:
                folder = out / _safe(name) / f"rate-{rate:g}" / (f"seed-{seed}" if len(seed_list) > 1 else "")
                s = _stored_point(folder / SUMMARY_JSON, name, rate, workload, seed, spec, fleet) if name in reuse else None
                if s is None:
                    result = simulate_run(workload, c, spec, name, label=f"{name} @ {rate:g}")
                    s = summarize(result)
                    s["strategy"], s["offered_rate"], s["simulated"], s["fleet"] = name, rate, True, fleet
                    s["workload_params"] = {**s["workload_params"], "seed": seed}
                    folder.mkdir(parents=True, exist_ok=True)
                    if ns.keep_records:
                        write_records(folder, result)
                    write_json(folder / SUMMARY_JSON, s)
                else:
                    reused += 1
                first = first or s
                res.points.setdefault(name, {}).setdefault(rate, []).append(point(s))
    if reuse:
        print(f"reused {reused} stored points of {', '.join(sorted(reuse))}; the rest simulated")
    res = finish_sweep(res, cfg, names, rate_list, seed_list, slo, first, command, res.target, simulated=True)
    print("goodput: " + ", ".join(f"{n} {g:g}" for n, g in res.goodput.items()))
    if res.goodput_verdict:
        v = res.goodput_verdict
        print(f"{v['subject']}'s goodput: {verdict_text(v, 'x' if is_trace else '')}")
    print(f"report: {res.report}")
    return 0


# Agreement the simulation must reach with a wall-clock run of the same seeded workload (issue #21).
PARITY = {"hit_rate": 0.01, "ttft_p50": 0.10, "ttft_p99": 0.10, "e2e_p50": 0.10, "per_backend": 0.05}


def parity(sim: dict[str, Any], wall: dict[str, Any]) -> dict[str, Any]:
    """How far one simulated summary is from its wall-clock twin: hit rate in points, latencies and
    requests per backend (sorted, busiest first: the backends are identical) relative to the wall run."""
    def rel(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else abs(a - b) / b

    le_s, le_w = sim["latency_emulated"], wall["latency_emulated"]
    out: dict[str, Any] = {"hit_rate": abs(sim["hit_rate"] - wall["hit_rate"]),
                           "ttft_p50": rel(le_s["ttft"]["p50"], le_w["ttft"]["p50"]),
                           "ttft_p99": rel(le_s["ttft"]["p99"], le_w["ttft"]["p99"]),
                           "e2e_p50": rel(le_s["e2e"]["p50"], le_w["e2e"]["p50"])}
    cs = sorted((d["requests"] for d in sim["per_backend"].values()), reverse=True)
    cw = sorted((d["requests"] for d in wall["per_backend"].values()), reverse=True)
    out["per_backend"] = max((abs(a - b) / b for a, b in zip(cs, cw) if b), default=None) if len(cs) == len(cw) else 1.0
    out["requests_per_backend"] = {"sim": cs, "wall": cw}
    out["ok"] = all(out[k] is not None and out[k] <= lim for k, lim in PARITY.items())
    return out


def against_wall(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    """Each strategy simulated (OUT/sim) and run for real at time scale 1 (OUT/wall); OUT/parity.json."""
    import asyncio

    from .compare import compare
    from .report import _f, _pct
    from .results import write_json

    out = Path(cfg.out)
    if ns.overhead_ms is None:
        ns.overhead_ms = calibrate_overhead(cfg, ns.backends, out / "overhead")
    sim_cfg = replace(cfg, out=str(out / "sim"))
    ns_sim = argparse.Namespace(**{**vars(ns), "seeds": str(cfg.workload.seed)})
    _compare(ns_sim, sim_cfg, command)
    from .results import read_json
    sims = read_json(out / "sim" / "summary.json")
    wall_cfg = replace(cfg, out=str(out / "wall"), time_scale=1.0, progress=False)
    res = asyncio.run(compare(wall_cfg, _names(ns.strategies), None, command, ns.backends, "subprocess"))
    table = {name: parity(sims[name], res.summaries[name]) for name in res.summaries}
    write_json(out / "parity.json", {"workload": cfg.workload.name, "limits": PARITY, "strategies": table,
                                     "overhead_ms": ns.overhead_ms,
                                     "sim": {n: _key_figures(s) for n, s in sims.items()},
                                     "wall": {n: _key_figures(s) for n, s in res.summaries.items()}})
    print("| strategy | hit rate sim / wall | TTFT p50 sim / wall | TTFT p99 sim / wall | E2E p50 sim / wall "
          "| requests per backend sim / wall | within limits |")
    print("|---|---|---|---|---|---|---|")
    for name, p in table.items():
        a, b = _key_figures(sims[name]), _key_figures(res.summaries[name])
        print(f"| {name} | {_pct(a['hit_rate'])} / {_pct(b['hit_rate'])} | {_f(a['ttft_p50'])} / {_f(b['ttft_p50'])} "
              f"| {_f(a['ttft_p99'])} / {_f(b['ttft_p99'])} | {_f(a['e2e_p50'])} / {_f(b['e2e_p50'])} "
              f"| {p['requests_per_backend']['sim']} / {p['requests_per_backend']['wall']} | {'yes' if p['ok'] else 'no'} |")
    return 0 if all(p["ok"] for p in table.values()) else 1


CALIBRATION_REQUESTS = 16
CALIBRATION_WARMUP = 2


def calibrate_overhead(cfg: RunConfig, backends: int, out: Path) -> float:
    """The real stack's per-request time outside the engines, in ms: the workload's first
    CALIBRATION_REQUESTS requests one at a time through `python -m proxy` and `backends` emulators
    (time scale 1, round robin; OUT/wall) and simulated without overhead; the median of wall TTFT
    minus simulated TTFT, request by request, after CALIBRATION_WARMUP cold ones. One at a time, the
    engines' timing is the profile's alone, so the difference is HTTP, the proxy and tokenizing; a
    loaded run pays more (CPU contention), which the simulation does not model."""
    import asyncio
    import contextlib
    import io
    import statistics

    from .compare import compare
    from .simulate import FleetSpec, simulate_run
    from .workloads import build_workload

    n = min(CALIBRATION_REQUESTS, cfg.workload.requests or CALIBRATION_REQUESTS)
    c = replace(cfg, rate=0.0, concurrency=1, duration=0.0, workload=replace(cfg.workload, requests=n))
    sim = {r.index: r.ttft for r in simulate_run(build_workload(c.workload), c, FleetSpec(backends=backends),
                                                 "round_robin").records if r.ttft is not None}
    with contextlib.redirect_stdout(io.StringIO()):
        res = asyncio.run(compare(replace(c, out=str(out / "wall"), time_scale=1.0, progress=False), ["round_robin"],
                                  None, "", backends, "subprocess"))
    wall = {r.index: r.ttft for r in res.results["round_robin"].records if r.ttft is not None}
    diffs = [wall[i] - sim[i] for i in sorted(sim)[CALIBRATION_WARMUP:] if i in wall]
    ms = max(0.0, statistics.median(diffs) * 1000) if diffs else 0.0
    print(f"the real stack's time outside the engines, one request at a time ({len(diffs)} requests after "
          f"{CALIBRATION_WARMUP} warm-up): {ms:.1f} ms a request; the simulation adds it (--overhead-ms)")
    return ms


def _key_figures(s: dict[str, Any]) -> dict[str, Any]:
    le = s["latency_emulated"]
    return {"hit_rate": s["hit_rate"], "ttft_p50": le["ttft"]["p50"], "ttft_p99": le["ttft"]["p99"],
            "e2e_p50": le["e2e"]["p50"], "ok": s["ok"], "errors": s["errors"],
            "lateness_ms": (s.get("backend_metrics", {}).get("step_lateness_mean_s") or 0.0) * 1000}


def find_backends(ns: argparse.Namespace, cfg: RunConfig, command: str) -> int:
    """Per strategy, the fewest backends that meet the SLO on this workload and load: doubling from 1, then
    bisection (assumes more backends never hurt). Every run tried is in OUT/capacity.json."""
    from .results import write_json
    from .simulate import simulate_run
    from .summary import summarize
    from .sweep import SLO, point
    from .workloads import build_workload

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = SLO(ns.slo_ttft_p99, ns.slo_tpot_p50)
    workload = build_workload(cfg.workload)
    tried: dict[str, dict[int, dict[str, Any]]] = {}
    needed: dict[str, int | None] = {}
    for name in _names(ns.strategies):
        runs = tried.setdefault(name, {})

        def meets(n: int) -> bool:
            if n not in runs:
                s = summarize(simulate_run(workload, cfg, fleet_spec(ns, cfg, backends=n), name))
                runs[n] = {**point(s), "met": None}
                runs[n]["met"] = slo.met(runs[n])
            return runs[n]["met"]

        lo, hi = 0, 1  # lo fails (0 backends serve nothing), hi is the candidate
        while hi < ns.max_backends and not meets(hi):
            lo, hi = hi, min(2 * hi, ns.max_backends)
        if not meets(hi):
            needed[name] = None
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if meets(mid) else (mid, hi)
        needed[name] = hi
    write_json(out / "capacity.json", {"workload": cfg.workload.name, "load": cfg.load_description,
                                       "slo": {"ttft_p99": slo.ttft_p99, "tpot_p50": slo.tpot_p50},
                                       "backends_needed": needed,
                                       "runs": {n: {str(k): v for k, v in sorted(r.items())} for n, r in tried.items()}})
    plot = _capacity_plot(tried, slo, out)
    print(f"backends needed for TTFT p99 <= {slo.ttft_p99:g} s and TPOT p50 <= {slo.tpot_p50:g} s "
          f"({cfg.workload.name}, {cfg.load_description}):")
    print("| strategy | backends | TTFT p99 there (s) | TPOT p50 there (s) |")
    print("|---|---|---|---|")
    for name, n in needed.items():
        p = tried[name].get(n) if n else None
        print(f"| {name} | {n if n else f'more than {ns.max_backends}'} | "
              f"{p['ttft_p99']:.3f} | {p['tpot_p50']:.4f} |" if p else f"| {name} | more than {ns.max_backends} | - | - |")
    found = [n for n in needed.values() if n]
    if found:
        fewest = min(found)
        print(f"fewest: {fewest} backends ({', '.join(k for k, n in needed.items() if n == fewest)}); plot: {plot}")
    return 0


def _capacity_plot(tried: dict[str, dict[int, dict[str, Any]]], slo, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, limit, label in ((axes[0], "ttft_p99", slo.ttft_p99, "TTFT p99 (emulated s)"),
                                  (axes[1], "tpot_p50", slo.tpot_p50, "TPOT p50 (emulated s)")):
        for name, runs in tried.items():
            ns_ = sorted(runs)
            ax.plot(ns_, [runs[n][key] for n in ns_], marker="o", label=name)
        ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("backends")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Capacity: the SLO metrics against the number of backends, per strategy")
    fig.tight_layout()
    path = out / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
