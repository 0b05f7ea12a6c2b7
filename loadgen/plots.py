"""PNG plots of one run and of a strategy comparison (matplotlib, Agg backend, labelled axes and units).

Times are plotted in emulated (GPU-equivalent) seconds: wall seconds divided by the run's time scale.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .backend_metrics import reported_block_size  # noqa: E402
from .runner import RunResult  # noqa: E402
from .summary import hit_rate  # noqa: E402

DPI = 110


def backend_label(url: str) -> str:
    """Short name of a backend URL for legends: host:port."""
    if not url:
        return "(none)"
    p = urlparse(url if "//" in url else "//" + url)
    return f"{p.hostname}:{p.port}" if p.port else (p.hostname or url)


def _unit(scale: float) -> str:
    return "emulated s" if scale != 1 else "s"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _ok(result: RunResult):
    return [r for r in result.records if r.ok]


def latency_distribution(result: RunResult, out: Path) -> Path:
    s = result.config.time_scale
    ok = _ok(result)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, field, title in zip(axes, ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "End-to-end latency")):
        vals = [getattr(r, field) / s for r in ok if getattr(r, field) is not None]
        if vals:
            ax.hist(vals, bins=40, color="tab:blue", alpha=0.8)
            for q, style in ((50, "--"), (99, ":")):
                v = float(np.percentile(vals, q))
                ax.axvline(v, color="k", linestyle=style, label=f"p{q} = {v:.3f}")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(f"{title.split(' ')[0]} ({_unit(s)})")
        ax.set_ylabel("requests")
    fig.suptitle(f"Latency distribution — {result.label}")
    return _save(fig, out / "latency_distribution.png")


def hit_rate_over_time(result: RunResult, out: Path, bins: int = 30) -> Path:
    s = result.config.time_scale
    ok = sorted(_ok(result), key=lambda r: r.start)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if ok:
        t = np.array([(r.start + (r.ttft or 0)) / s for r in ok])
        prompt = np.array([r.prompt_tokens for r in ok], dtype=float)
        cached = np.array([r.cached_tokens for r in ok], dtype=float)
        edges = np.linspace(0, t.max() + 1e-9, bins + 1)
        idx = np.clip(np.digitize(t, edges) - 1, 0, bins - 1)
        p_bin = np.bincount(idx, prompt, bins)
        c_bin = np.bincount(idx, cached, bins)
        mid = (edges[:-1] + edges[1:]) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(mid, np.where(p_bin > 0, c_bin / p_bin, np.nan) * 100, "o-", label="per interval")
        ax.plot(t, np.cumsum(cached) / np.cumsum(prompt) * 100, "-", label="cumulative")
        ax.legend()
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"time since start ({_unit(s)})")
    ax.set_ylabel("prefix-cache hit rate (% of prompt tokens)")
    ax.set_title(f"Cache hit rate over time — {result.label}")
    return _save(fig, out / "hit_rate_over_time.png")


def worker_load(result: RunResult, out: Path) -> Path:
    ok = _ok(result)
    per: dict[str, list] = defaultdict(list)
    for r in ok:
        per[r.backend].append(r)
    names = sorted(per)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [backend_label(n) for n in names]
    axes[0].bar(labels, [len(per[n]) for n in names], color="tab:blue")
    axes[0].set_ylabel("requests served")
    axes[0].set_title("Requests per backend")
    axes[1].bar(labels, [sum(r.prompt_tokens - r.cached_tokens for r in per[n]) for n in names],
                color="tab:red", label="computed (miss)")
    axes[1].bar(labels, [sum(r.cached_tokens for r in per[n]) for n in names],
                bottom=[sum(r.prompt_tokens - r.cached_tokens for r in per[n]) for n in names],
                color="tab:green", label="cached (hit)")
    axes[1].set_ylabel("prompt tokens")
    axes[1].set_title("Prompt tokens per backend")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("backend")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Worker load distribution — {result.label}")
    return _save(fig, out / "worker_load.png")


def latency_by_cache_status(result: RunResult, out: Path) -> Path:
    s = result.config.time_scale
    ok = _ok(result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, field, title in zip(axes, ("ttft", "e2e"), ("TTFT", "End-to-end latency")):
        groups = [[getattr(r, field) / s for r in ok if r.hit == h and getattr(r, field) is not None]
                  for h in (True, False)]
        labels = [f"HIT (n={len(groups[0])})", f"MISS (n={len(groups[1])})"]
        data = [g if g else [np.nan] for g in groups]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks([1, 2], labels)
        ax.set_ylabel(f"{title} ({_unit(s)})")
        ax.set_title(title)
    fig.suptitle(f"Latency by cache status (HIT = some prompt tokens cached) — {result.label}")
    return _save(fig, out / "latency_by_cache_status.png")


def prefix_match_length(result: RunResult, out: Path) -> Path:
    """What the proxy believed it matched against what the backend reported cached, side by side
    (overlaid, identical histograms would hide one another)."""
    ok = _ok(result)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bs = reported_block_size(result.metrics_before)
    pairs = [(r.cached_tokens // bs, r.matched_blocks) for r in ok]
    cached = [c for c, _ in pairs]
    matched = [m for _, m in pairs if m is not None]
    hi = max(cached + matched + [1])
    bins = np.linspace(0, hi + 1, min(40, hi + 2))
    data, labels = [cached], ["cached blocks (backend usage)"]
    if matched:
        data.append(matched)
        labels.append("matched blocks (proxy header)")
    ax.hist(data, bins=bins, label=labels, color=["tab:green", "tab:purple"][:len(data)])
    agree = sum(1 for c, m in pairs if m is not None and m == c)
    with_header = sum(1 for _, m in pairs if m is not None)
    ax.set_xlabel(f"prefix match length ({bs}-token blocks)")
    ax.set_ylabel("requests")
    title = f"Prefix match length distribution — {result.label}"
    if with_header:
        title += f"\nproxy's match = backend's cache for {agree} of {with_header} requests"
    ax.set_title(title)
    ax.legend()
    return _save(fig, out / "prefix_match_length.png")


def _count_axis(ax, values: list[float]) -> None:
    """Request counts: integer ticks from 0, at least 0..1, so all-zero data is a flat line at 0, not noise."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max([1.0, *values]) * 1.08)


def _held(samples: list, grid: np.ndarray, field: str, scale: float) -> np.ndarray:
    """A gauge's value at each grid time: the last scrape at or before it (0 before the first)."""
    t = np.array([x.t / scale for x in samples])
    v = np.array([getattr(x, field) for x in samples], dtype=float)
    idx = np.searchsorted(t, grid, side="right") - 1
    return np.where(idx >= 0, v[np.clip(idx, 0, None)], 0.0)


def backend_metrics_over_time(result: RunResult, out: Path, name: str = "backend_metrics.png") -> Path | None:
    if not result.samples:
        return None
    s = result.config.time_scale
    by: dict[str, list] = defaultdict(list)
    for x in result.samples:
        by[x.backend].append(x)
    names = sorted(by)
    for b in names:
        by[b].sort(key=lambda x: x.t)
    grid = np.unique([x.t / s for x in result.samples])
    labels = [backend_label(b) for b in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for b, label in zip(names, labels):
        axes[0].plot(grid, _held(by[b], grid, "kv_usage", s) * 100, label=label, drawstyle="steps-post")
    # Request counts stacked per backend: the top edge is the total, each band one backend's share (separate
    # lines of 0/1 at concurrency 1 cross into a tangle).
    for ax, field in ((axes[1], "running"), (axes[2], "waiting")):
        ys = [_held(by[b], grid, field, s) for b in names]
        ax.stackplot(grid, ys, labels=labels, step="post", alpha=0.85)
        _count_axis(ax, list(np.sum(ys, axis=0)))
    for ax, yl in zip(axes, ("KV cache usage (%)", "running requests (stacked per backend)",
                             "waiting requests (stacked per backend)")):
        ax.set_xlabel(f"time since start ({_unit(s)})")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylim(0, 100)
    if not any(x.waiting for x in result.samples):
        axes[2].set_title("no request waited", fontsize=9)
    fig.suptitle(f"Backend metrics over time (vllm:* scraped from each emulator) — {result.label}")
    return _save(fig, out / name)


def prefix_sweep(result: RunResult, out: Path) -> Path | None:
    s = result.config.time_scale
    by: dict[int, list] = defaultdict(list)
    for r in _ok(result):
        if "prefix_len" in r.tags:
            by[int(r.tags["prefix_len"])].append(r)
    if not by:
        return None
    lengths = sorted(by)
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(lengths, [hit_rate(by[n]) * 100 for n in lengths], "o-", color="tab:green", label="hit rate")
    ax1.set_xscale("symlog", linthresh=16)
    ax1.set_xlabel("shared prefix length (tokens)")
    ax1.set_ylabel("prefix-cache hit rate (% of prompt tokens)", color="tab:green")
    ax1.set_ylim(0, 100)
    ax2 = ax1.twinx()
    ax2.plot(lengths, [np.percentile([r.ttft for r in by[n]], 50) / s for n in lengths], "s--", color="tab:blue",
             label="TTFT p50")
    ax2.set_ylabel(f"TTFT p50 ({_unit(s)})", color="tab:blue")
    ax1.set_title(f"Hit rate and TTFT vs shared prefix length — {result.label}")
    return _save(fig, out / "hit_rate_vs_prefix_length.png")


def run_plots(result: RunResult, out: Path) -> list[Path]:
    """All single-run plots into `out`; those drawn from answered requests only when some succeeded."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path | None] = []
    if _ok(result):
        paths += [latency_distribution(result, out), hit_rate_over_time(result, out), worker_load(result, out),
                  latency_by_cache_status(result, out), prefix_match_length(result, out)]
    paths += [backend_metrics_over_time(result, out), prefix_sweep(result, out)]
    return [p for p in paths if p is not None]


def compare_bars(summaries: dict[str, dict], out: Path) -> Path:
    names = list(summaries)
    scale = next(iter(summaries.values()))["time_scale"] if summaries else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = plt.cm.tab10(np.arange(len(names)))
    panels = (("ttft_p50_emulated", f"TTFT p50 ({_unit(scale)})"), ("ttft_p99_emulated", f"TTFT p99 ({_unit(scale)})"),
              ("hit_rate", "prefix-cache hit rate (%)"))
    for ax, (key, label) in zip(axes, panels):
        vals = [(summaries[n][key] or 0.0) * (100 if key == "hit_rate" else 1) for n in names]
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, fmt="%.1f" if key == "hit_rate" else "%.3f", fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("routing strategy")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("Strategies on the same seeded workload: TTFT p50 / p99 and hit rate")
    return _save(fig, out / "compare_ttft_hit_rate.png")


def compare_ttft_cdf(results: dict[str, RunResult], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    scale = 1.0
    for name, res in results.items():
        scale = res.config.time_scale
        v = np.sort([r.ttft / scale for r in _ok(res) if r.ttft is not None])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v) * 100, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"TTFT ({_unit(scale)}, log scale)")
    ax.set_ylabel("requests (%)")
    ax.set_title("TTFT CDF per strategy")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "compare_ttft_cdf.png")


def compare_backend_distribution(results: dict[str, RunResult], out: Path) -> Path:
    names = list(results)
    backends = sorted({r.backend for res in results.values() for r in _ok(res)})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(backends))
    for i, name in enumerate(names):
        counts = [sum(1 for r in _ok(results[name]) if r.backend == b) for b in backends]
        ax.bar(x + i * width, counts, width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [backend_label(b) for b in backends], rotation=15)
    ax.set_xlabel("backend")
    ax.set_ylabel("requests served")
    ax.set_title("Per-backend request distribution per strategy")
    ax.legend()
    return _save(fig, out / "compare_backend_distribution.png")


def compare_backend_metrics(results: dict[str, RunResult], out: Path) -> Path | None:
    with_samples = {n: r for n, r in results.items() if r.samples}
    if not with_samples:
        return None
    fig, axes = plt.subplots(len(with_samples), 2, figsize=(12, 2.8 * len(with_samples)), squeeze=False)
    for row, (name, res) in enumerate(with_samples.items()):
        s = res.config.time_scale
        by: dict[str, list] = defaultdict(list)
        for x in res.samples:
            by[x.backend].append(x)
        for b in sorted(by):
            t = [x.t / s for x in by[b]]
            axes[row][0].plot(t, [x.kv_usage * 100 for x in by[b]], label=backend_label(b))
            axes[row][1].plot(t, [x.running + x.waiting for x in by[b]], label=backend_label(b))
        axes[row][0].set_ylabel(f"{name}\nKV usage (%)")
        axes[row][0].set_ylim(0, 100)
        axes[row][1].set_ylabel("running + waiting")
        for ax in axes[row]:
            ax.set_xlabel(f"time since start ({_unit(s)})")
        axes[row][1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Per-backend KV usage and queue over time (from each emulator's /metrics)")
    return _save(fig, out / "compare_backend_metrics.png")


def compare_plots(results: dict[str, RunResult], summaries: dict[str, dict], out: Path) -> list[Path]:
    """Comparison plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path | None] = []
    if any(_ok(r) for r in results.values()):  # every request failed: no blank axes
        paths += [compare_bars(summaries, out), compare_ttft_cdf(results, out), compare_backend_distribution(results, out)]
    paths.append(compare_backend_metrics(results, out))
    if any(r.workload.name == "prefix-sweep" and _ok(r) for r in results.values()):
        paths.append(compare_sweep(results, out))
    return [p for p in paths if p is not None]


def compare_sweep(results: dict[str, RunResult], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        by: dict[int, list] = defaultdict(list)
        for r in _ok(res):
            by[int(r.tags.get("prefix_len", 0))].append(r)
        lengths = sorted(by)
        ax.plot(lengths, [hit_rate(by[n]) * 100 for n in lengths], "o-", label=name)
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlabel("shared prefix length (tokens)")
    ax.set_ylabel("prefix-cache hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Hit rate vs shared prefix length per strategy")
    ax.legend()
    return _save(fig, out / "compare_hit_rate_vs_prefix_length.png")
