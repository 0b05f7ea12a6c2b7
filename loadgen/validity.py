"""Is a run a measurement of routing, or of a starved machine?

Two clocks can fall behind: the emulators' engine steps (`kvroute:emulator_step_lateness_seconds`,
a CPU too busy to run the modelled GPU on time) and the load generator's own arrivals (an open-loop
request sent later than its Poisson time). Past `--lateness-limit` (mean, emulated seconds) the
latencies are the machine's, not the strategy's: the console says so as soon as it is seen, and the
run is marked invalid in its summary, its report, the sweep's tables and `sweep-table`.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from kvblocks.logs import get_logger

# Healthy runs on the 2-core dev machine stay below ~2.5 emulated ms per step (docs/results/*-sweep);
# a CPU-bound one (4 emulators at --time-scale 0.1) reached ~117 ms. 10 ms is a third of a decode step.
DEFAULT_LATENESS_LIMIT = 0.01
# Steps seen before the running mean is trusted (the first steps after an idle period are noisy).
MIN_STEPS = 20


def step_lateness(summary: dict[str, Any]) -> float | None:
    """Mean emulated seconds the emulators' engine steps ran late (None: no emulator reported it)."""
    late = summary.get("backend_metrics", {}).get("step_lateness_mean_s")
    return None if late is None else late / summary["time_scale"]


def dispatch_lateness(summary: dict[str, Any]) -> float | None:
    """Mean emulated seconds the load generator sent open-loop requests after their arrival time."""
    d = summary.get("dispatch_lateness_emulated") or {}
    return d.get("avg")


def invalid_reason(summary: dict[str, Any], limit: float) -> str | None:
    """Why the run's latencies are the machine's, or None when both clocks kept within `limit` (0: never)."""
    if limit <= 0:
        return None
    reasons = []
    step = step_lateness(summary)
    if step is not None and step > limit:
        reasons.append(f"engine steps {step * 1000:.1f} ms late on average")
    sent = dispatch_lateness(summary)
    if sent is not None and sent > limit:
        reasons.append(f"requests sent {sent * 1000:.1f} ms after their arrival times on average")
    if not reasons:
        return None
    return f"machine-bound: {' and '.join(reasons)} (emulated; > --lateness-limit {limit * 1000:g} ms)"


class LatenessWatch:
    """Watches one run's two clocks while it runs and prints one warning line the moment either mean
    passes the limit (above the progress bar), so a starved run is known before it ends."""

    def __init__(self, label: str, limit: float, time_scale: float,
                 before: dict[str, dict[str, float]] | None = None, log_format: str = "console") -> None:
        self.label, self.limit, self.time_scale = label, limit, time_scale
        self.log_format = log_format  # "json": through the log stack, one object a line, as --log-format says
        self.before = before or {}
        self.warned: list[str] = []  # the warnings printed, one per clock at most
        self._kinds: set[str] = set()
        self._late_sum = 0.0
        self._late_n = 0

    def _warn(self, kind: str, what: str) -> None:
        if kind in self._kinds:
            return
        self._kinds.add(kind)
        self.warned.append(what)
        if self.log_format == "json":
            get_logger("loadgen.validity").warning("machine-bound run: marked invalid", run=self.label, reason=what,
                                                   lateness_limit_ms=self.limit * 1000)
            return
        tqdm.write(f"warning: {self.label}: {what} (emulated; > --lateness-limit {self.limit * 1000:g} ms): the "
                   "machine, not the strategy, sets these latencies; the run is marked invalid", file=sys.stderr)

    def on_scrape(self, metrics: dict[str, dict[str, float]], final: bool = False) -> None:
        """A scrape of every backend: the emulators' mean step lateness since the run began (`final`:
        the scrape after the run, judged however few steps it saw, as the summary is)."""
        if self.limit <= 0:
            return
        steps = late = 0.0
        for url, m in metrics.items():
            b = self.before.get(url, {})
            steps += m.get("lateness_steps", 0.0) - b.get("lateness_steps", 0.0)
            late += m.get("lateness_sum", 0.0) - b.get("lateness_sum", 0.0)
        if steps >= (1 if final else MIN_STEPS) and late / steps / self.time_scale > self.limit:
            self._warn("steps", f"engine steps {late / steps / self.time_scale * 1000:.1f} ms late on average")

    def on_dispatch(self, late_wall_s: float) -> None:
        """An open-loop request sent `late_wall_s` after its arrival time."""
        if self.limit <= 0:
            return
        self._late_sum += max(0.0, late_wall_s)
        self._late_n += 1
        mean = self._late_sum / self._late_n / self.time_scale
        if self._late_n >= MIN_STEPS and mean > self.limit:
            self._warn("dispatch", f"requests sent {mean * 1000:.1f} ms after their arrival times on average")


def too_many_errors(summaries: dict[str, dict[str, Any]], max_share: float) -> list[str]:
    """One line per run whose failed share exceeds `max_share` (cancelled requests are not failures):
    a run whose requests failed measured nothing, whatever its latencies say."""
    lines = []
    for name, s in summaries.items():
        done = s["requests_sent"] - s["cancelled"]
        share = s["errors"] / done if done else 0.0
        if share > max_share:
            first = next(iter(s.get("error_kinds") or {}), "")
            lines.append(f"{name}: {s['errors']} of {done} requests failed ({share:.1%} > --max-error-share "
                         f"{max_share:g}){'; first error: ' + first if first else ''}")
    return lines
