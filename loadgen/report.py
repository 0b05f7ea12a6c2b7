"""report.md for a run or a comparison: the command, the load, tables and the plots, ready to paste."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .plots import backend_label

TIME_NOTE = (
    "**Time units.** *Measured* = wall-clock seconds seen by the client. *Emulated* = measured / time scale: "
    "the emulators run with `--time-scale` = wall seconds per emulated second (0.1 = 10x faster than the modelled "
    "GPU), so emulated seconds are GPU-equivalent seconds (client, proxy and HTTP overheads are divided by the "
    "same factor, i.e. magnified when it is below 1). "
    "Plots use emulated seconds."
)


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _header(title: str, command: str, s: dict[str, Any], target: str) -> list[str]:
    return [
        f"# {title}", "",
        f"- Command: `{command}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- Target: {target}",
        f"- Workload: `{s['workload']}` with {_params(s['workload_params'])}",
        f"- Load: {s['load']}; time scale {s['time_scale']:g} "
        f"(emulated GPU seconds = wall seconds / {s['time_scale']:g})",
        *[f"- Note: {n}" for n in s.get("notes", [])],
        "",
    ]


def _params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _busy_line(s: dict[str, Any]) -> str:
    bm = s.get("backend_metrics", {})
    if "running_mean_per_backend" not in bm:
        return "–"
    return f"{bm['running_mean_per_backend']:.2f} / {bm['waiting_mean_per_backend']:.2f}"


def latency_table(s: dict[str, Any]) -> list[str]:
    lines = ["| metric | avg | p50 | p95 | p99 | unit |", "|---|---|---|---|---|---|"]
    for kind, key, unit in (("emulated", "latency_emulated", "emulated s"), ("measured", "latency", "wall s")):
        for f in ("ttft", "tpot", "e2e"):
            st = s[key][f]
            lines.append(f"| {f.upper()} ({kind}) | {_f(st['avg'])} | {_f(st['p50'])} | {_f(st['p95'])} | "
                         f"{_f(st['p99'])} | {unit} |")
    return lines


def per_backend_table(s: dict[str, Any]) -> list[str]:
    per_metrics = s.get("backend_metrics", {}).get("per_backend", {})
    lines = ["| backend | requests | share | hit rate | mean running | mean waiting | mean KV usage |",
             "|---|---|---|---|---|---|---|"]
    for b, d in s["per_backend"].items():
        m = per_metrics.get(b, {})
        lines.append(f"| {backend_label(b)} | {d['requests']} | {_pct(d['share'])} | {_pct(d['hit_rate'])} | "
                     f"{_f(m.get('running_mean'), 2)} | {_f(m.get('waiting_mean'), 2)} | {_pct(m.get('kv_usage_mean'))} |")
    return lines


def run_report(s: dict[str, Any], command: str, target: str, plots: list[Path], out: Path) -> Path:
    """report.md of one run."""
    lines = _header(f"Load test: `{s['workload']}`", command, s, target)
    lines += invalid_lines(s)
    if s.get("interrupted"):
        lines += [f"**Interrupted** (Ctrl-C) after {s['requests_sent']} of {s['requests_planned']} requests; "
                  "the figures cover only those.", ""]
    lines += [
        "## Summary", "",
        "| requests sent | ok | errors | cancelled | hit rate | throughput (req/s, emulated) | "
        "throughput (req/s, measured) | mean running / waiting per backend |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['requests_sent']}/{s['requests_planned']} | {s['ok']} | {s['errors']} | {s['cancelled']} | "
        f"{_pct(s['hit_rate'])} | {_f(s['throughput_rps_emulated'], 2)} | {_f(s['throughput_rps'], 2)} | "
        f"{_busy_line(s)} |", "",
        "## Latency", "", *latency_table(s), "",
        "## HIT vs MISS (HIT = at least one prompt token cached)", "",
        "| status | requests | TTFT p50 | TTFT p99 | unit |", "|---|---|---|---|---|",
    ]
    scale = s["time_scale"]
    for name, n, st in (("HIT", s["hit_requests"], s["ttft_hit"]), ("MISS", s["miss_requests"], s["ttft_miss"])):
        p50 = st["p50"] / scale if st["p50"] is not None else None
        p99 = st["p99"] / scale if st["p99"] is not None else None
        lines.append(f"| {name} | {n} | {_f(p50)} | {_f(p99)} | emulated s |")
    lines += ["", "## Per backend", "", *per_backend_table(s), ""]
    if s.get("error_kinds"):
        lines += ["## Errors", "", *[f"- {n} x `{k}`" for k, n in s["error_kinds"].items()], ""]
    if s.get("by_prefix_len"):
        lines += ["## Hit rate and TTFT per shared prefix length", "",
                  "| prefix tokens | requests | hit rate | TTFT p50 (emulated s) | TTFT p99 (emulated s) |",
                  "|---|---|---|---|---|"]
        for k, g in s["by_prefix_len"].items():
            lines.append(f"| {k} | {g['requests']} | {_pct(g['hit_rate'])} | {_f(g['ttft_emulated']['p50'])} | "
                         f"{_f(g['ttft_emulated']['p99'])} |")
        lines.append("")
    lines += _consistency(s)
    lines += ["## Plots", "", *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots], ""]
    if not s["ok"]:
        lines += ["No latency, hit-rate or load plots: no request succeeded (see Errors).", ""]
    lines += [TIME_NOTE, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def invalid_lines(s: dict[str, Any], name: str = "") -> list[str]:
    """The warning a run whose clocks fell behind carries above its figures (loadgen.validity)."""
    if not s.get("invalid"):
        return []
    return [f"**Invalid as a routing measurement{f' ({name})' if name else ''}**: {s['invalid']}. The latencies "
            "below are the machine's; rerun with a larger `--time-scale`, fewer backends or a quieter machine.", ""]


def prediction_line(s: dict[str, Any]) -> list[str]:
    """The router's matched-block prediction against what the backends reported cached."""
    p = s.get("prediction")
    if not p:
        return ["Prediction accuracy: – (the router sent no `x-kvroute-matched-blocks`).", ""]
    return [f"Prediction accuracy: {_pct(p['accuracy'])} of the {p['predicted_blocks']} blocks the router predicted "
            f"cached (`x-kvroute-matched-blocks`) were cached; per request {p['exact_requests']} exact, "
            f"{p['over_requests']} over-predicted, {p['under_requests']} under-predicted "
            f"(of {p['requests']}).", ""]


def _consistency(s: dict[str, Any]) -> list[str]:
    bm = s.get("backend_metrics", {})
    if "prefix_hits_delta_total" not in bm:
        return prediction_line(s)
    lines = [*prediction_line(s), f"Cached tokens: {s['cached_tokens']} counted from usage by the load generator; "
             f"{bm['prefix_hits_delta_total']:.0f} added to the backends' `vllm:prefix_cache_hits_total` "
             f"during the run. Preemptions: {bm.get('preemptions_delta_total', 0):.0f}.", ""]
    if "step_lateness_mean_s" in bm:
        late = bm["step_lateness_mean_s"]
        lines += [f"Emulation fidelity: engine steps ended on average {late * 1000:.2f} ms (wall) after their "
                  f"scheduled time (`kvroute:emulator_step_lateness_seconds`), i.e. {late / s['time_scale'] * 1000:.2f} "
                  "emulated ms per step.", ""]
    return lines


def compare_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The headline table: one row per strategy (latencies in emulated seconds)."""
    lines = ["| strategy | hit rate | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (s) | E2E p50 (s) | throughput (req/s) "
             "| errors | mean running / waiting per backend | busiest backend share | valid |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        le = s["latency_emulated"]
        shares = [d["share"] for d in s["per_backend"].values()]
        label = f"{name} (interrupted: {s['requests_sent']}/{s['requests_planned']} sent)" if s.get("interrupted") else name
        lines.append(f"| {label} | {_pct(s['hit_rate'])} | {_f(s['ttft_p50_emulated'])} | {_f(s['ttft_p99_emulated'])} | "
                     f"{_f(le['tpot']['p50'], 4)} | {_f(le['e2e']['p50'])} | {_f(s['throughput_rps_emulated'], 2)} | "
                     f"{s['errors']} | {_busy_line(s)} | {_pct(max(shares) if shares else None)} | "
                     f"{'**no** (machine-bound)' if s.get('invalid') else 'yes'} |")
    return lines


def compare_report(summaries: dict[str, dict[str, Any]], command: str, target: str, plots: list[Path],
                   out: Path, not_run: list[str] | tuple[str, ...] = ()) -> Path:
    """report.md of a strategy comparison; an interrupted one says which strategies did not (fully) run."""
    first = next(iter(summaries.values()))
    lines = _header(f"Routing strategies compared on `{first['workload']}`", command, first, target)
    for n, s in summaries.items():
        lines += invalid_lines(s, n)
    cut = [n for n, s in summaries.items() if s.get("interrupted")]
    if cut or not_run:
        lines += [f"**Interrupted**: {', '.join(cut) or 'a run'} stopped early (Ctrl-C)"
                  + (f"; not run: {', '.join(not_run)}" if not_run else "")
                  + ". Figures of an interrupted run cover only the requests it sent.", ""]
    lines += [
        f"Each strategy ran the same seeded workload ({first['requests_planned']} requests) against one proxy; "
        "between runs the strategy was switched (`PUT /admin/strategy`) and the proxy's index and every "
        "backend's prefix cache were reset (`POST /admin/reset`).", "",
        "## Results (emulated GPU seconds)", "", *compare_table(summaries), "",
        "Hit rate = cached prompt tokens / prompt tokens (from `usage.prompt_tokens_details.cached_tokens`). "
        "Throughput in requests per emulated second. Running / waiting = mean of `vllm:num_requests_running` / "
        "`vllm:num_requests_waiting` over the run, per backend.", "",
        "## Measured wall-clock latencies", "",
        "| strategy | TTFT p50 (wall s) | TTFT p99 (wall s) | E2E p50 (wall s) | duration (wall s) |",
        "|---|---|---|---|---|",
        *[f"| {n} | {_f(s['ttft_p50'])} | {_f(s['ttft_p99'])} | {_f(s['latency']['e2e']['p50'])} | "
          f"{_f(s['duration_s'], 1)} |" for n, s in summaries.items()], "",
        "## Per-backend distribution", "",
    ]
    for name, s in summaries.items():
        lines += [f"### {name}", "", *per_backend_table(s), "", *_consistency(s)]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots], "",
              "Per-strategy plots (latency distribution, hit rate over time, worker load, HIT vs MISS latency, "
              "prefix match lengths, backend metrics) are in each strategy's folder.", "", TIME_NOTE, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
