"""Goodput sweep: every strategy at every offered load on the same seeded workload, against ONE proxy.

    python -m loadgen sweep --workload burst --strategies kv_aware,round_robin --rates 4,8,12

At each rate every strategy runs the same requests (strategy switched and caches reset through the
admin API in between; strategies interleaved per rate so a machine slowing down mid-sweep hits them
alike). Goodput is the highest rate a strategy sustains within the SLO (TTFT p99 and TPOT p50 in
emulated seconds, no failed request) at that rate and every lower one, the measure serving papers
and llm-d's benchmarks report. Regret is the subject strategy's gap to the best of the others per
metric and rate. For `trace` the "rates" are trace speed-ups. `--seeds` repeats every point per
seed: the spread between seeds is the run-to-run noise the regret must be read against.

    python -m loadgen sweep --peer sglang-router --target http://127.0.0.1:30000/v1 --reset-target \
        --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002 --workload burst --rates 8,16

runs another router as the one strategy (caches reset on its backends between points); `sweep-table`
given both folders puts it in the row of the kvroute sweep of the same workload.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

import aiohttp

from .backend_metrics import base_url
from .compare import DEFAULT_ALIAS, _safe
from .config import RunConfig
from .preflight import preflight
from .proxy_admin import AdminError, ProxyAdmin
from .report import TIME_NOTE, _f, _header, _pct
from .results import SUMMARY_JSON, write_json, write_records
from .runner import run_workload
from .stack import managed_proxy
from .summary import summarize
from .validity import too_many_errors
from .workloads import build_workload

SWEEP_JSON = "sweep.json"
# The no-regret bar of issue #13: no worse than the best of the load-only baselines.
BASELINES = ("round_robin", "least_loaded")
# (key, label, lower is better) of the metrics a sweep plots, tabulates and computes regret on.
METRICS = (
    ("ttft_p50", "TTFT p50 (s)", True),
    ("ttft_p99", "TTFT p99 (s)", True),
    ("e2e_p50", "E2E p50 (s)", True),
    ("hit_rate", "hit rate", False),
)


@dataclass
class SLO:
    ttft_p99: float = 2.0
    tpot_p50: float = 0.05

    def met(self, p: dict[str, Any]) -> bool:
        return (p["errors"] == 0 and p["ok"] == p["planned"] and p["ttft_p99"] is not None
                and p["ttft_p99"] <= self.ttft_p99 and p["tpot_p50"] is not None and p["tpot_p50"] <= self.tpot_p50)


@dataclass
class SweepResult:
    target: str = ""
    # strategy -> rate -> per-seed points (compact metrics of one run)
    points: dict[str, dict[float, list[dict[str, Any]]]] = field(default_factory=dict)
    goodput: dict[str, float] = field(default_factory=dict)
    goodput_verdict: dict[str, Any] = field(default_factory=dict)
    regret: dict[str, Any] = field(default_factory=dict)
    regret_baselines: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] = field(default_factory=dict)
    # One line per point whose failed share exceeded --max-error-share (the CLI then exits 1).
    failed_points: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    report: Path | None = None


def point(s: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run a sweep keeps (latencies in emulated seconds)."""
    le = s["latency_emulated"]
    shares = [d["share"] for d in s["per_backend"].values()]
    pred = s.get("prediction") or {}
    return {
        "seed": s["workload_params"].get("seed"), "planned": s["requests_planned"], "ok": s["ok"],
        "errors": s["errors"] + s["cancelled"], "hit_rate": s["hit_rate"],
        "ttft_p50": le["ttft"]["p50"], "ttft_p99": le["ttft"]["p99"], "tpot_p50": le["tpot"]["p50"],
        "e2e_p50": le["e2e"]["p50"], "e2e_p99": le["e2e"]["p99"], "throughput": s["throughput_rps_emulated"],
        "busiest_share": max(shares) if shares else None, "prediction_accuracy": pred.get("accuracy"),
        "preemptions": s.get("backend_metrics", {}).get("preemptions_delta_total"),
        "lateness": lateness(s),
        "invalid": s.get("invalid"),
    }


def lateness(s: dict[str, Any]) -> float | None:
    """Mean emulated seconds the emulators' engine steps ran late: a CPU-starved run reads high."""
    late = s.get("backend_metrics", {}).get("step_lateness_mean_s")
    return None if late is None else late / s["time_scale"]


def averaged(ps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every numeric figure (None stays None when any seed lacks it)."""
    out: dict[str, Any] = {}
    for k in ps[0]:
        vals = [p[k] for p in ps]
        if k == "invalid":  # the first seed's reason, if any seed ran machine-bound
            out[k] = next((v for v in vals if v), None)
            continue
        out[k] = None if any(v is None for v in vals) else (mean(vals) if k != "seed" else vals)
    out["errors"] = sum(p["errors"] for p in ps)
    out["ok"], out["planned"] = sum(p["ok"] for p in ps), sum(p["planned"] for p in ps)
    return out


def goodput(points: dict[float, list[dict[str, Any]]], slo: SLO) -> float:
    """Highest rate met within the SLO at it and every lower rate (0 when the lowest misses)."""
    best = 0.0
    for rate in sorted(points):
        if not slo.met(averaged(points[rate])):
            break
        best = rate
    return best


def goodput_by_seed(points: dict[float, list[dict[str, Any]]], slo: SLO) -> dict[str, float]:
    """Goodput of each seed's runs on their own, by repr(seed): a mean over seeds can sit just past
    the SLO when no seed does (or within it when none does)."""
    seeds = sorted({repr(p["seed"]) for ps in points.values() for p in ps})
    out = {}
    for sd in seeds:
        best = 0.0
        for rate in sorted(points):
            run = next((p for p in points[rate] if repr(p["seed"]) == sd), None)
            if run is None or not slo.met(run):
                break
            best = rate
        out[sd] = best
    return out


def goodput_verdict(points: dict[str, dict[float, list[dict[str, Any]]]], slo: SLO, subject: str) -> dict[str, Any]:
    """The subject's goodput against the strategy with the highest: "highest" (ties included), else
    paired seed by seed (same workload): "beyond noise" when it sustained less on every seed (two
    seeds at least), "within noise" when on some seed it sustained as much; "lower" from one seed."""
    if subject not in points:
        return {}
    mean_g = {n: goodput(p, slo) for n, p in points.items()}
    if len(points) == 1:  # nothing to be highest among
        return {"subject": subject, "goodput": mean_g[subject], "per_seed": goodput_by_seed(points[subject], slo),
                "verdict": "only strategy"}
    best_name = max(mean_g, key=lambda n: (mean_g[n], n == subject))
    mine, theirs = goodput_by_seed(points[subject], slo), goodput_by_seed(points[best_name], slo)
    out = {"subject": subject, "goodput": mean_g[subject], "best": best_name, "best_goodput": mean_g[best_name],
           "per_seed": mine, "best_per_seed": theirs}
    if mean_g[subject] >= mean_g[best_name]:
        return {**out, "verdict": "highest"}
    paired = [(mine[sd], theirs[sd]) for sd in mine if sd in theirs]
    if len(paired) < 2:
        return {**out, "verdict": "lower"}
    lower_everywhere = all(a < b for a, b in paired)
    return {**out, "verdict": "beyond noise" if lower_everywhere else "within noise",
            "lower_on": sum(a < b for a, b in paired), "seeds": len(paired)}


def regret(points: dict[str, dict[float, list[dict[str, Any]]]], subject: str,
           against: list[str] | None = None) -> dict[str, Any]:
    """Per rate and metric: the subject's value, the best other strategy (of `against`, default all)
    and its value, and the gap (latencies: subject / best - 1; hit rate: best - subject); 0 when the
    subject is best."""
    out: dict[str, Any] = {}
    others = [n for n in points if n != subject and (against is None or n in against)]
    if subject not in points or not others:
        return out
    for rate in sorted(points[subject]):
        mine = averaged(points[subject][rate])
        row = {}
        for key, _, lower in METRICS:
            cands = [(averaged(points[n][rate])[key], n) for n in others if rate in points[n]]
            cands = [(v, n) for v, n in cands if v is not None]
            if mine[key] is None or not cands:
                continue
            v, n = min(cands) if lower else max(cands)
            gap = _gap(mine[key], v, lower)
            row[key] = {"value": mine[key], "best": v, "best_strategy": n, "regret": max(0.0, gap),
                        **_against_noise(points[subject][rate], points[n][rate], key, lower, gap)}
        out[f"{rate:g}"] = row
    return out


def _spread(vals: list[float | None], relative: bool) -> float:
    vals = [v for v in vals if v is not None]
    if len(vals) < 2:
        return 0.0
    return (max(vals) - min(vals)) / mean(vals) if relative and mean(vals) > 0 else max(vals) - min(vals)


def _gap(a: float | None, b: float | None, lower: bool) -> float | None:
    if a is None or b is None:
        return None
    return (a / b - 1 if b else 0.0) if lower else b - a


def _against_noise(mine: list[dict[str, Any]], best: list[dict[str, Any]], key: str, lower: bool,
                   gap: float) -> dict[str, Any]:
    """How a gap compares with run-to-run noise, from the seeds both strategies ran: the larger of the
    two strategies' spreads between seeds ((max - min) / mean; points for hit rate), the gap seed by
    seed (same workload for both), and whether it is beyond noise (worse on every seed and by more
    than that spread). Nothing is claimed from one seed."""
    by_seed = {repr(p["seed"]): p[key] for p in best}
    paired = [_gap(p[key], by_seed.get(repr(p["seed"])), lower) for p in mine]
    paired = [g for g in paired if g is not None]
    if len(paired) < 2:
        return {"seeds": len(paired)}
    spread = max(_spread([p[key] for p in ps], lower) for ps in (mine, best))
    worse_everywhere = all(g > 0 for g in paired)
    return {"seeds": len(paired), "noise": spread, "paired": paired, "worse_on": sum(g > 0 for g in paired),
            "beyond_noise": bool(gap > 0 and worse_everywhere and gap > spread)}


def noise(points: dict[str, dict[float, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Spread between seeds of one (strategy, rate): (max - min) / mean per metric, worst over points."""
    worst: dict[str, float] = {}
    for by_rate in points.values():
        for ps in by_rate.values():
            if len(ps) < 2:
                continue
            for key, _, _ in METRICS:
                vals = [p[key] for p in ps if p[key] is not None]
                if len(vals) >= 2 and mean(vals) > 0:
                    worst[key] = max(worst.get(key, 0.0), (max(vals) - min(vals)) / mean(vals))
    return worst


class PeerRouter:
    """Another router (sglang-router, vllm-router, ...) run as the sweep's one strategy, `name`: no
    strategy to switch, and between points the backends' prefix caches are reset on the backends
    themselves (`POST /reset_prefix_cache`, vLLM's dev API and the emulator's). The router's own view
    of the caches is not reset: it sees cold caches as after a backend restart."""

    def __init__(self, name: str, backends: list[str]) -> None:
        self.name, self.backend_urls = name, backends

    async def strategy(self) -> str:
        return self.name

    async def set_strategy(self, name: str) -> None:
        if name != self.name:
            raise AdminError(f"{self.name} is another router: it has no strategy {name!r} to switch to")

    async def backends(self) -> list[str]:
        return list(self.backend_urls)

    async def reset(self) -> None:
        """Every backend's prefix cache, or AdminError naming the one that refused (a request still
        holding blocks after the point ended, or a vLLM without its dev API)."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for url in self.backend_urls:
                reset = base_url(url) + "/reset_prefix_cache"
                try:
                    async with s.post(reset) as r:
                        status, text = r.status, await r.text()
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    raise AdminError(f"POST {reset}: {e or type(e).__name__}") from None
                try:
                    body: Any = json.loads(text)
                except ValueError:
                    body = text[:200]
                if status != 200 or not isinstance(body, dict) or body.get("success") is False:
                    raise AdminError(f"POST {reset} -> HTTP {status}: {body}")


async def sweep(config: RunConfig, strategies: list[str], rates: list[float], target: str | None = None,
                command: str = "", backends: int = 4, spawn: str = "subprocess", slo: SLO | None = None,
                seeds: list[int] | None = None, keep_records: bool = False,
                max_lateness: float = 0.0, peer: PeerRouter | None = None) -> SweepResult:
    """Run every strategy at every rate (and seed); write summaries, sweep.json, plots and report.md.

    `max_lateness` > 0: a point whose emulators' steps ran later than that on average (emulated s;
    the machine was starved, e.g. by other jobs) is run once more and the less late run kept.
    `peer`: `target` is another router, run as one strategy under the peer's name."""
    slo = slo or SLO()
    seeds = seeds or [config.workload.seed]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    is_trace = config.workload.name == "trace"
    unit = "x" if is_trace else " req/s"
    res = SweepResult()
    if peer is not None and not target:
        raise ValueError("a peer router sweep needs the router's --target")
    async with managed_proxy(target, config.time_scale, backends, spawn) as stack:
        res.target = config.target = stack.target
        admin: ProxyAdmin | PeerRouter = peer or ProxyAdmin(stack.target, config.admin_key)
        original = await admin.strategy()
        names = [peer.name] if peer else [original if s == DEFAULT_ALIAS else s for s in strategies]
        backend_urls = await admin.backends()
        # The model once for every point, with the backends' name when the target says `unknown`.
        config.model = (await preflight(stack.target, config.model, config.api_key, config.time_scale,
                                        backend_urls)).model
        first_summary = None
        try:
            for seed in seeds:
                wl_cfg = replace(config.workload, seed=seed)
                for rate in rates:
                    if is_trace:
                        cfg = replace(config, rate=0.0, concurrency=0, workload=replace(wl_cfg, trace_speedup=rate))
                    else:
                        cfg = replace(config, rate=rate, concurrency=0, workload=wl_cfg)
                    workload = build_workload(cfg.workload)
                    for name in names:
                        await admin.set_strategy(name)
                        await admin.reset()
                        result = await run_workload(workload, cfg, backend_urls, label=f"{name} @ {rate:g}")
                        s = summarize(result)
                        late = lateness(s)
                        if max_lateness > 0 and late is not None and late > max_lateness and not result.interrupted:
                            print(f"{name} @ {rate:g}: engine steps {late * 1000:.1f} ms late on average "
                                  f"(> {max_lateness * 1000:.1f}); running it again", file=sys.stderr)
                            await admin.reset()
                            again = await run_workload(workload, cfg, backend_urls, label=f"{name} @ {rate:g}")
                            s2 = summarize(again)
                            if (lateness(s2) or 0.0) < late:
                                result, s = again, s2
                            s["reruns"] = 1
                        s["strategy"], s["offered_rate"] = name, rate
                        s["workload_params"] = {**s["workload_params"], "seed": seed}
                        first_summary = first_summary or s
                        folder = out / _safe(name) / f"rate-{rate:g}" / (f"seed-{seed}" if len(seeds) > 1 else "")
                        folder.mkdir(parents=True, exist_ok=True)
                        if keep_records:
                            write_records(folder, result)
                        write_json(folder / SUMMARY_JSON, s)
                        res.points.setdefault(name, {}).setdefault(rate, []).append(point(s))
                        where = f"{name} @ {rate:g}{unit}" + (f" (seed {seed})" if len(seeds) > 1 else "")
                        for line in too_many_errors({where: s}, config.max_error_share):
                            print(f"error: point {line}", file=sys.stderr, flush=True)
                            res.failed_points.append(line)
                        if result.interrupted:
                            raise KeyboardInterrupt
        except KeyboardInterrupt:
            print("interrupted: writing what was measured", file=sys.stderr)
        finally:
            try:
                await admin.set_strategy(original)
            except (AdminError, OSError, aiohttp.ClientError) as e:
                print(f"warning: could not restore strategy {original!r}: {e}", file=sys.stderr)
    where = f"{stack.target} ({peer.name}: another router, not kvroute)" if peer else stack.description
    return finish_sweep(res, config, names, rates, seeds, slo, first_summary, command, where, peer is not None)


def finish_sweep(res: SweepResult, config: RunConfig, names: list[str], rates: list[float], seeds: list[int],
                 slo: SLO, first_summary: dict[str, Any] | None, command: str, where: str,
                 peer: bool = False, simulated: bool = False) -> SweepResult:
    """Goodput, regret and noise from `res.points`; sweep.json, the plot and report.md in `config.out`
    (shared by the wall-clock sweep and `simulate --sweep`)."""
    out = Path(config.out)
    is_trace = config.workload.name == "trace"
    res.goodput = {n: goodput(p, slo) for n, p in res.points.items()}
    subject = names[0]
    res.goodput_verdict = goodput_verdict(res.points, slo, subject)
    res.regret = regret(res.points, subject)
    res.regret_baselines = regret(res.points, subject, list(BASELINES))
    res.noise = noise(res.points)
    write_json(out / SWEEP_JSON, {
        "workload": config.workload.name, "strategies": names, "rates": rates, "seeds": seeds,
        "rate_kind": "trace speed-up" if is_trace else "req/s (emulated)",
        "slo": {"ttft_p99": slo.ttft_p99, "tpot_p50": slo.tpot_p50}, "goodput": res.goodput,
        "goodput_seeds": {n: goodput_by_seed(p, slo) for n, p in res.points.items()},
        "goodput_verdict": res.goodput_verdict, "subject": subject, "failed_points": res.failed_points, "regret": res.regret, "regret_baselines": res.regret_baselines, "noise": res.noise,
        "points": {n: {f"{r:g}": ps for r, ps in p.items()} for n, p in res.points.items()},
    })
    if res.points and first_summary is not None:
        res.plots = [sweep_plot(res.points, config.workload.name, is_trace, out)]
        res.report = sweep_report(res, first_summary, command, where, slo, subject, is_trace, out, peer, simulated)
    return res


def sweep_plot(points: dict[str, dict[float, list[dict[str, Any]]]], workload: str, is_trace: bool, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    for ax, (key, label, _) in zip(axes, METRICS):
        for name, by_rate in points.items():
            rates = sorted(by_rate)
            vals = [averaged(by_rate[r])[key] for r in rates]
            ax.plot(rates, [v * 100 if key == "hit_rate" and v is not None else v for v in vals], marker="o", label=name)
        ax.set_xlabel("trace speed-up (x)" if is_trace else "offered load (req/s, emulated)")
        ax.set_ylabel(label.replace("(s)", "(emulated s)") if key != "hit_rate" else "hit rate (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"`{workload}`: latency and hit rate against offered load, per strategy")
    fig.tight_layout()
    path = out / "sweep_latency_hit_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_report(res: SweepResult, first: dict[str, Any], command: str, target: str, slo: SLO, subject: str,
                 is_trace: bool, out: Path, peer: bool = False, simulated: bool = False) -> Path:
    unit = "x" if is_trace else " req/s"
    lines = _header(f"Goodput sweep on `{first['workload']}`", command, first, target)
    seeds = sorted({sd for p in res.points.values() for ps in p.values() for q in ps for sd in [q["seed"]]})
    load = "trace speed-up" if is_trace else "offered rate"
    ran = (f"`{subject}` (another router) ran the seeded workload ({first['requests_planned']} requests per "
           f"point) at every {load}; between runs every backend's prefix cache was reset on the backend (the "
           "router's own view of the caches was not)." if peer else
           f"Every strategy ran the same seeded workload ({first['requests_planned']} requests per point) at every "
           f"{load}, each run a fresh simulation: the proxy's router with an empty index over new emulated "
           "backends with empty caches." if simulated else
           f"Every strategy ran the same seeded workload ({first['requests_planned']} requests per point) at every "
           f"{load}, against one proxy; between runs the strategy was switched and the proxy's index and every "
           "backend's prefix cache were reset.")
    lines += [
        f"{ran} Seeds: {', '.join(map(str, seeds))} (figures are means over seeds). Latencies in emulated seconds.", "",
        f"## Goodput (SLO: TTFT p99 <= {slo.ttft_p99:g} s, TPOT p50 <= {slo.tpot_p50:g} s, no failed request)", "",
        "| strategy | goodput | per seed |", "|---|---|---|",
        *[f"| {n} | {g:g}{unit} | {_seeds_cell(goodput_by_seed(res.points[n], slo))} |" for n, g in res.goodput.items()], "",
        "Goodput = highest offered load met within the SLO there and at every lower load (0 = not even the "
        "lowest), from the means over seeds; per seed, from each seed's runs alone.", "",
        *([f"`{subject}`'s goodput: {verdict_text(res.goodput_verdict, unit)}.", ""] if res.goodput_verdict else []),
        ("Step lateness is 0 here: in virtual time no engine step runs late, whatever the machine's load." if simulated
         else "Step lateness = how late the emulators' engine steps ran on average (emulated ms): the CPU the run "
         "had. High values mean the machine, not the strategy, set the latencies: such a point is marked "
         "not valid (`--lateness-limit`)."), "",
        *_invalid_summary(res),
        "## Every point", "",
        "| load | strategy | hit rate | TTFT p50 | TTFT p99 | TPOT p50 | E2E p50 | throughput (req/s) | errors "
        "| busiest backend | prediction accuracy | preemptions | step lateness (ms) | within SLO | valid |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates = sorted({r for p in res.points.values() for r in p})
    for r in rates:
        for n, by_rate in res.points.items():
            if r not in by_rate:
                continue
            a = averaged(by_rate[r])
            lines.append(
                f"| {r:g}{unit} | {n} | {_pct(a['hit_rate'])} | {_f(a['ttft_p50'])} | {_f(a['ttft_p99'])} | "
                f"{_f(a['tpot_p50'], 4)} | {_f(a['e2e_p50'])} | {_f(a['throughput'], 2)} | {a['errors']} | "
                f"{_pct(a['busiest_share'])} | {_pct(a['prediction_accuracy'])} | "
                f"{_f(a['preemptions'], 0) if a['preemptions'] is not None else '–'} | "
                f"{_f(a['lateness'] * 1000, 1) if a['lateness'] is not None else '–'} | {'yes' if slo.met(a) else 'no'} | "
                f"{'**no**: ' + a['invalid'] if a.get('invalid') else 'yes'} |")
    for title, table in ((f"## Regret of `{subject}` against the best other strategy (0 = best or tied)", res.regret),
                         (f"## Regret of `{subject}` against the best of {' and '.join(BASELINES)} (the no-regret bar)",
                          res.regret_baselines)):
        if table:
            lines += ["", title, "", *regret_table(table, unit)]
    if res.noise:
        lines += ["", "## Run-to-run noise (same strategy and load, different seeds)", "",
                  "| metric | worst spread (max - min) / mean |", "|---|---|",
                  *[f"| {k} | {v * 100:.0f}% |" for k, v in res.noise.items()]]
    lines += ["", "## Plots", "",
              *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in res.plots], "",
              "Per-point summaries: `<strategy>/rate-<load>/summary.json`.", "", TIME_NOTE, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def invalid_points(points: dict[str, dict[Any, list[dict[str, Any]]]]) -> list[str]:
    """'kv_aware @ 8 (seed 1): machine-bound: ...' per run that ran machine-bound."""
    out = []
    for n, by_rate in points.items():
        for r, ps in by_rate.items():
            for p in ps:
                if p.get("invalid"):
                    seed = f" (seed {p['seed']})" if len(ps) > 1 else ""
                    out.append(f"{n} @ {float(r):g}{seed}: {p['invalid']}")
    return out


def _invalid_summary(res: SweepResult) -> list[str]:
    bad = invalid_points(res.points)
    if not bad:
        return []
    return [f"**{len(bad)} point(s) not valid as routing measurements** (the machine set their latencies):", "",
            *[f"- {b}" for b in bad], ""]


def regret_table(table: dict[str, Any], unit: str) -> list[str]:
    lines = ["| load | " + " | ".join(label for _, label, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for r, row in table.items():
        cells = []
        for key, _, lower in METRICS:
            c = row.get(key)
            if c is None:
                cells.append("–")
            elif lower:
                cells.append(f"+{c['regret'] * 100:.0f}% vs {c['best_strategy']} ({_f(c['value'])} / {_f(c['best'])})"
                             f"{_noise_note(c, lower)}" if c["regret"] > 0 else "0")
            else:
                cells.append(f"-{c['regret'] * 100:.1f} pts vs {c['best_strategy']}{_noise_note(c, lower)}"
                             if c["regret"] > 0 else "0")
        lines.append(f"| {r}{unit} | " + " | ".join(cells) + " |")
    return lines


def _seeds_cell(by_seed: dict[str, float]) -> str:
    return ", ".join(f"{g:g}" for g in by_seed.values())


def verdict_text(v: dict[str, Any], unit: str) -> str:
    """'highest', 'within noise of sglang's 24 req/s (lower on 1 of 2 seeds: 16, 16 against 24, 16)', or
    for a sweep of one strategy '8 req/s, the only strategy run (nothing to compare it with)'."""
    if v["verdict"] == "only strategy":
        return f"{v['goodput']:g}{unit}, the only strategy run (nothing to compare it with)"
    if v["verdict"] == "highest":
        return "highest"
    seeds = f"{_seeds_cell(v['per_seed'])} against {_seeds_cell(v['best_per_seed'])}"
    lower_on = f"lower on {v['lower_on']} of {v['seeds']} seeds: " if "seeds" in v else ""
    return f"{v['verdict']} of {v['best']}'s {v['best_goodput']:g}{unit} ({lower_on}{seeds})"


def _noise_note(c: dict[str, Any], lower: bool) -> str:
    """'; within noise (worse on 1 of 2 seeds, spread 20%)' or '; beyond noise (...)'; nothing from one seed."""
    if "noise" not in c:
        return ""
    spread = f"{c['noise'] * 100:.0f}%" if lower else f"{c['noise'] * 100:.1f} pts"
    verdict = "beyond noise" if c["beyond_noise"] else "within noise"
    return f"; {verdict} (worse on {c['worse_on']} of {c['seeds']} seeds, spread {spread})"


def sweep_table(folders: list[Path], table_key: str = "regret_baselines") -> list[str]:
    """The docs' sweep table (docs/loadgen.md) from sweep folders: goodput per strategy and workload, and the subject's
    worst regret over the load levels per metric (`python -m loadgen sweep-table docs/results/*-sweep`).
    Folders of one workload share its row: a peer router's sweep joins the kvroute sweep before it."""
    from .results import read_json

    rows: list[dict[str, Any]] = []
    strategies: list[str] = []
    for folder in folders:
        path = Path(folder) / SWEEP_JSON
        if not path.exists():
            continue
        data = read_json(path)
        for n in data["strategies"]:
            if n not in strategies:
                strategies.append(n)
        same = next((d for d in rows if d["workload"] == data["workload"]), None)
        if same is None:
            rows.append(data)
            continue
        # A second sweep of the same workload (a peer router's, `sweep --peer`): its strategies join
        # the first's row, their goodput read with the first's SLO; the regret columns stay the first's.
        for n, p in data["points"].items():
            if n not in same["points"]:
                same["points"][n] = p
                same["strategies"].append(n)
                same["goodput"][n] = goodput({float(r): ps for r, ps in p.items()}, SLO(**same["slo"]))
    unit = {True: "x", False: ""}
    against = "the best of " + " and ".join(BASELINES) if table_key == "regret_baselines" else "the best other"
    subject = rows[0]["subject"] if rows else ""
    invalid_any = False
    lines = ["| workload | loads | " + " | ".join(strategies) + f" | {subject}'s goodput | worst regret of " +
             subject + f" against {against}: TTFT p50 / TTFT p99 / E2E p50 / hit rate |",
             "|---|---|" + "---|" * len(strategies) + "---|---|"]
    for d in rows:
        is_trace = d["rate_kind"].startswith("trace")
        best = max(d["goodput"].values()) if d["goodput"] else 0
        # Recomputed from the stored runs, so a sweep.json written before per-seed goodput reads alike.
        slo = SLO(**d["slo"])
        points = {n: {float(r): ps for r, ps in p.items()} for n, p in d["points"].items()}
        cells = []
        for n in strategies:
            g = d["goodput"].get(n)
            per_seed = goodput_by_seed(points[n], slo) if n in points else {}
            seeds = f" ({_seeds_cell(per_seed)})" if len(per_seed) > 1 else ""
            bad = sum(bool(q.get("invalid")) for ps in points.get(n, {}).values() for q in ps)
            mark = f" ⚠ {bad} invalid point{'s' * (bad > 1)}" if bad else ""
            invalid_any = invalid_any or bool(bad)
            cells.append("–" if g is None else (f"**{g:g}{unit[is_trace]}**{seeds}{mark}" if g == best
                                                else f"{g:g}{unit[is_trace]}{seeds}{mark}"))
        cells.append(verdict_text(goodput_verdict(points, slo, d["subject"]), unit[is_trace]))
        worst: dict[str, tuple[float, str, Any]] = {}
        for load, row in d.get(table_key, d["regret"]).items():
            for key, c in row.items():
                # A gap beyond noise outranks a larger one within it: the table must not hide it.
                rank = (bool(c.get("beyond_noise")), c["regret"])
                if key not in worst or rank > (bool(worst[key][2]), worst[key][0]):
                    worst[key] = (c["regret"], c["best_strategy"] if c["regret"] > 0 else "", c.get("beyond_noise"), load)
        parts = []
        for key, _, lower in METRICS:
            r, who, beyond, load = worst.get(key, (0.0, "", None, ""))
            if r <= 0:
                parts.append("0")
            else:
                mark = "" if beyond is None else (", beyond noise" if beyond else ", within noise")
                at = f"at {load}{unit[is_trace]}, {who}{mark}"
                parts.append(f"+{r * 100:.0f}% ({at})" if lower else f"-{r * 100:.1f} pts ({at})")
        loads = ",".join(f"{float(x):g}" for x in d["rates"]) + (" (speed-up)" if is_trace else " req/s")
        lines.append(f"| `{d['workload']}` | {loads} | " + " | ".join(cells) + " | " + " / ".join(parts) + " |")
    if invalid_any:
        lines += ["", "⚠ invalid point: the emulators' steps (or the load generator's arrivals) ran later than "
                  "`--lateness-limit`: the machine, not the strategy, set its latencies (see the sweep's report.md)."]
    return lines
