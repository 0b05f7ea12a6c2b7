"""One-run strategy comparison: the same seeded workload once per strategy against ONE proxy.

Between strategies the proxy's strategy is switched and its index and every backend's prefix cache
are reset through the admin API, so each strategy starts cold on identical requests. Without a
target, a proxy with embedded emulators is started for the comparison (see `stack.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .config import RunConfig
from kvblocks.cli import UsageError
from kvblocks.logs import get_logger

from .plots import compare_plots, run_plots
from .preflight import preflight
from .proxy_admin import AdminError, ProxyAdmin
from .report import compare_report, run_report
from .results import SUMMARY_JSON, write_json, write_records
from .runner import RunResult, run_workload
from .stack import managed_proxy
from .summary import summarize
from .workloads import build_workload

DEFAULT_ALIAS = "default"
log = get_logger("loadgen")


@dataclass
class CompareResult:
    """Per-strategy results and summaries, in the order run, plus the written files."""

    target: str
    results: dict[str, RunResult] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    report: Path | None = None
    # Strategies asked for that never ran (a run before them was interrupted).
    not_run: list[str] = field(default_factory=list)


async def compare(config: RunConfig, strategies: list[str], target: str | None = None, command: str = "",
                  backends: int = 4, spawn: str = "subprocess") -> CompareResult:
    """Run every strategy on `config`'s workload; write records, summary.json, plots and report.md to `config.out`.

    `target` is a running proxy's OpenAI base URL; None starts one with `backends` embedded emulators.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = build_workload(config.workload)
    async with managed_proxy(target, config.time_scale, backends, spawn) as stack:
        target = config.target = stack.target
        admin = ProxyAdmin(target, config.admin_key)
        original, available = await admin.strategy_and_available()
        unknown = [s for s in strategies if s != DEFAULT_ALIAS and available and s not in available]
        if unknown:
            raise UsageError("--strategies", f"{target} has no strategy {', '.join(map(repr, unknown))}; "
                             f"it has {', '.join(available)}")
        names = [original if s == DEFAULT_ALIAS else s for s in strategies]
        backend_urls = await admin.backends()
        config.model = (await preflight(target, config.model, config.api_key, config.time_scale, backend_urls)).model
        res = CompareResult(target)
        try:
            for name in names:
                await admin.set_strategy(name)
                await admin.reset()
                result = await run_workload(workload, config, backend_urls, label=name)
                summary = summarize(result)
                summary["strategy"] = name
                summary["is_default"] = name == original
                res.results[name] = result
                res.summaries[name] = summary
                folder = out / _safe(name)
                write_records(folder, result)
                write_json(folder / SUMMARY_JSON, summary)
                run_report(summary, command, target, run_plots(result, folder), folder)
                if result.interrupted:
                    res.not_run = names[names.index(name) + 1:]
                    break
        finally:
            try:
                await admin.set_strategy(original)
            except (AdminError, OSError, aiohttp.ClientError) as e:
                log.warning("could not restore the proxy's strategy", strategy=original, target=target, error=str(e))
    write_json(out / SUMMARY_JSON, res.summaries)
    res.plots = compare_plots(res.results, res.summaries, out)
    res.report = compare_report(res.summaries, command, stack.description, res.plots, out, res.not_run)
    return res


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
