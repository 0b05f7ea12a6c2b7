"""Summary statistics of a run: hit rate, latency percentiles, throughput, per-backend load.

Latencies are measured in wall-clock seconds. With emulators at `time_scale` wall seconds per emulated
second, the `emulated` block gives the same figures divided by the time scale: GPU-equivalent seconds.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from .backend_metrics import reported_block_size
from .client import RequestRecord
from .runner import RunResult
from .validity import invalid_reason

LATENCY_FIELDS = ("ttft", "tpot", "e2e")


def stats(values: list[float]) -> dict[str, float | None]:
    """avg/p50/p95/p99/max of `values` (None when empty)."""
    if not values:
        return {"avg": None, "p50": None, "p95": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"avg": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def _scaled(d: dict[str, float | None], scale: float) -> dict[str, float | None]:
    return {k: (v / scale if v is not None else None) for k, v in d.items()}


def hit_rate(records: list[RequestRecord]) -> float:
    """Cached prompt tokens / prompt tokens over successful requests."""
    prompt = sum(r.prompt_tokens for r in records if r.ok)
    return sum(r.cached_tokens for r in records if r.ok) / prompt if prompt else 0.0


def _latency_block(records: list[RequestRecord]) -> dict[str, dict[str, float | None]]:
    return {f: stats([getattr(r, f) for r in records if r.ok and getattr(r, f) is not None]) for f in LATENCY_FIELDS}


def group_stats(records: list[RequestRecord], tag: str, scale: float) -> dict[str, dict[str, Any]]:
    """Hit rate and TTFT per value of a workload tag (e.g. prefix_len in the sweep)."""
    groups: dict[Any, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if tag in r.tags:
            groups[r.tags[tag]].append(r)
    out = {}
    for key in sorted(groups):
        rs = groups[key]
        ttft = stats([r.ttft for r in rs if r.ok and r.ttft is not None])
        out[str(key)] = {"requests": len(rs), "errors": sum(not r.ok for r in rs), "hit_rate": hit_rate(rs),
                         "ttft": ttft, "ttft_emulated": _scaled(ttft, scale)}
    return out


def backend_load(result: RunResult) -> dict[str, Any]:
    """Mean/max running, waiting and KV usage per backend from the sampled metrics, and counter deltas."""
    per: dict[str, dict[str, Any]] = {}
    by: dict[str, list] = defaultdict(list)
    for s in result.samples:
        by[s.backend].append(s)
    for b, ss in sorted(by.items()):
        per[b] = {
            "samples": len(ss),
            "running_mean": float(np.mean([s.running for s in ss])), "running_max": max(s.running for s in ss),
            "waiting_mean": float(np.mean([s.waiting for s in ss])), "waiting_max": max(s.waiting for s in ss),
            "kv_usage_mean": float(np.mean([s.kv_usage for s in ss])), "kv_usage_max": max(s.kv_usage for s in ss),
        }
    for b in set(result.metrics_before) | set(result.metrics_after):
        before, after = result.metrics_before.get(b, {}), result.metrics_after.get(b, {})
        entry = per.setdefault(b, {})
        entry["prefix_hits_delta"] = after.get("prefix_hits", 0.0) - before.get("prefix_hits", 0.0)
        entry["prefix_queries_delta"] = after.get("prefix_queries", 0.0) - before.get("prefix_queries", 0.0)
        entry["preemptions_delta"] = after.get("preemptions", 0.0) - before.get("preemptions", 0.0)
        steps = after.get("lateness_steps", 0.0) - before.get("lateness_steps", 0.0)
        if steps > 0:
            entry["engine_steps"] = steps
            entry["step_lateness_mean_s"] = (after.get("lateness_sum", 0.0) - before.get("lateness_sum", 0.0)) / steps
    out: dict[str, Any] = {"per_backend": per}
    if result.samples:
        # Mean over time of the summed load across backends, and per backend on average.
        times = sorted({s.t for s in result.samples})
        n = max(1, len(by))
        out["running_mean_per_backend"] = float(np.mean([s.running for s in result.samples]))
        out["waiting_mean_per_backend"] = float(np.mean([s.waiting for s in result.samples]))
        out["kv_usage_mean"] = float(np.mean([s.kv_usage for s in result.samples]))
        out["sample_times"] = len(times)
        out["backends_sampled"] = n
    if result.metrics_before or result.metrics_after:
        out["prefix_hits_delta_total"] = sum(v.get("prefix_hits_delta", 0.0) for v in per.values())
        out["prefix_queries_delta_total"] = sum(v.get("prefix_queries_delta", 0.0) for v in per.values())
        out["preemptions_delta_total"] = sum(v.get("preemptions_delta", 0.0) for v in per.values())
        steps = sum(v.get("engine_steps", 0.0) for v in per.values())
        if steps:
            out["step_lateness_mean_s"] = sum(v.get("engine_steps", 0.0) * v["step_lateness_mean_s"]
                                              for v in per.values() if "engine_steps" in v) / steps
    return out


def prediction(records: list[RequestRecord], block_size: int = 16) -> dict[str, Any] | None:
    """How well the router's matched-block prediction (`x-kvroute-matched-blocks`) matched the cache.

    Per request, predicted = matched blocks (capped so the last prompt token is computed, as the
    backend caps hits) and cached = cached tokens / block size. `accuracy` = predicted blocks that
    were cached / predicted blocks; over / under = requests predicting more / fewer than cached.
    """
    pairs = []
    for r in records:
        if r.ok and r.matched_blocks is not None:
            cap = max(0, (r.prompt_tokens - 1) // block_size)
            pairs.append((min(r.matched_blocks, cap), r.cached_tokens // block_size))
    if not pairs:
        return None
    predicted = sum(p for p, _ in pairs)
    confirmed = sum(min(p, c) for p, c in pairs)
    return {
        "requests": len(pairs),
        "predicted_blocks": predicted,
        "cached_blocks": sum(c for _, c in pairs),
        "confirmed_blocks": confirmed,
        "accuracy": confirmed / predicted if predicted else 1.0,
        "exact_requests": sum(p == c for p, c in pairs),
        "over_requests": sum(p > c for p, c in pairs),
        "under_requests": sum(p < c for p, c in pairs),
    }


def per_backend_from_metrics(result: RunResult) -> dict[str, Any]:
    """Requests and hit rate per backend from the backends' own counters (vllm:request_success,
    vllm:prefix_cache_*), for a router that does not name the backend in a header (a peer router)."""
    out: dict[str, Any] = {}
    deltas = {}
    for b in sorted(set(result.metrics_before) | set(result.metrics_after)):
        before, after = result.metrics_before.get(b, {}), result.metrics_after.get(b, {})
        deltas[b] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("requests", "prefix_hits", "prefix_queries")}
    total = sum(d["requests"] for d in deltas.values())
    for b, d in deltas.items():
        q = d["prefix_queries"]
        out[b] = {"requests": int(d["requests"]), "share": d["requests"] / total if total else 0.0,
                  "prompt_tokens": int(q), "cached_tokens": int(d["prefix_hits"]),
                  "hit_rate": d["prefix_hits"] / q if q else 0.0, "source": "backend metrics"}
    return out


def summarize(result: RunResult) -> dict[str, Any]:
    """The summary.json entry of one run."""
    recs = result.records
    scale = result.config.time_scale
    ok = [r for r in recs if r.ok]
    cancelled = [r for r in recs if r.error == "cancelled"]
    failed = [r for r in recs if not r.ok and r.error != "cancelled"]
    lat = _latency_block(recs)
    hits = [r for r in ok if r.hit]
    misses = [r for r in ok if not r.hit]
    dur = result.duration or 1e-9
    backends = Counter(r.backend or "(none)" for r in ok)
    per_backend: dict[str, Any] = {}
    for b, n in sorted(backends.items()):
        rs = [r for r in ok if (r.backend or "(none)") == b]
        per_backend[b] = {"requests": n, "share": n / len(ok), "prompt_tokens": sum(r.prompt_tokens for r in rs),
                          "cached_tokens": sum(r.cached_tokens for r in rs), "hit_rate": hit_rate(rs)}
    if set(backends) == {"(none)"} and (result.metrics_before or result.metrics_after):
        from_metrics = per_backend_from_metrics(result)
        if sum(d["requests"] for d in from_metrics.values()):
            per_backend = from_metrics
            backends = Counter({b: d["requests"] for b, d in from_metrics.items()})
    counts = list(backends.values())
    matched = [r.matched_blocks for r in ok if r.matched_blocks is not None]
    block_size = reported_block_size(result.metrics_before)
    cached_blocks = [r.cached_tokens // block_size for r in ok]
    summary: dict[str, Any] = {
        "label": result.label,
        "workload": result.workload.name,
        "strategy": Counter(r.strategy for r in ok).most_common(1)[0][0] if ok and ok[0].strategy else "",
        "load": result.config.load_description,
        "arrivals": result.arrivals,
        "time_scale": scale,
        "requests_planned": len(result.workload.requests),
        "requests_sent": len(recs),
        "ok": len(ok),
        "errors": len(failed),
        "cancelled": len(cancelled),
        "error_kinds": dict(Counter(r.error[:120] for r in failed).most_common(10)),
        "interrupted": result.interrupted,
        "stopped_by_duration": result.stopped_by_duration,
        "duration_s": result.duration,
        "duration_emulated_s": result.duration / scale,
        "hit_rate": hit_rate(recs),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "hit_requests": len(hits),
        "miss_requests": len(misses),
        "throughput_rps": len(ok) / dur,
        "throughput_rps_emulated": len(ok) / dur * scale,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / dur,
        "output_tokens_per_s_emulated": sum(r.completion_tokens for r in ok) / dur * scale,
        "ttft_p50": lat["ttft"]["p50"],
        "ttft_p99": lat["ttft"]["p99"],
        "latency": lat,
        "latency_emulated": {f: _scaled(v, scale) for f, v in lat.items()},
        "ttft_hit": stats([r.ttft for r in hits if r.ttft is not None]),
        "ttft_miss": stats([r.ttft for r in misses if r.ttft is not None]),
        "e2e_hit": stats([r.e2e for r in hits if r.e2e is not None]),
        "e2e_miss": stats([r.e2e for r in misses if r.e2e is not None]),
        "per_backend": per_backend,
        "load_imbalance": (max(counts) / (sum(counts) / len(counts))) if counts else None,
        "matched_blocks": stats([float(m) for m in matched]) if matched else None,
        "cached_blocks": stats([float(c) for c in cached_blocks]),
        "block_size": block_size,
        "prediction": prediction(ok, block_size),
        "backend_metrics": backend_load(result),
        "workload_params": result.workload.params,
        "notes": result.workload.notes,
    }
    summary["dispatch_lateness_emulated"] = (_scaled(stats(result.dispatch_lateness), scale)
                                             if result.dispatch_lateness else None)
    summary["lateness_limit"] = result.config.lateness_limit
    summary["invalid"] = invalid_reason(summary, result.config.lateness_limit)
    summary["ttft_p50_emulated"] = summary["latency_emulated"]["ttft"]["p50"]
    summary["ttft_p99_emulated"] = summary["latency_emulated"]["ttft"]["p99"]
    if result.workload.name == "prefix-sweep":
        summary["by_prefix_len"] = group_stats(recs, "prefix_len", scale)
    elif result.workload.name == "multiturn":
        summary["by_turn"] = group_stats(recs, "turn", scale)
    return summary
