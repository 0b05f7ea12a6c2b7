"""One `/metrics` for `--workers N`: the workers' expositions merged into the proxy's.

Each worker counts its own requests (counters, histograms, its admission gauges), while what the
workers share (each backend's in-flight requests, indexed blocks, index mode, peers) is already the
whole proxy's in every worker. So counters, histograms and the per-process gauges are summed over
the workers, and every other gauge is the answering worker's. Replicas on other hosts are not
merged: Prometheus scrapes each of them and sums there.
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

# Gauges one worker holds for itself alone (summed over the workers).
PER_PROCESS_GAUGES = frozenset({"kvroute_requests_in_flight", "kvroute_api_keys_in_flight"})
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
METRICS_REQUEST = b"metrics"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge(local: str, others: Iterable[str]) -> str:
    """`local`'s exposition with the summed families added up over `others` (text format 0.0.4)."""
    families = list(text_string_to_metric_families(local))
    summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in families:
        if fam.type in SUMMED_TYPES or fam.name in PER_PROCESS_GAUGES:
            for s in fam.samples:
                summed[(s.name, tuple(sorted(s.labels.items())))] = s.value
    wanted = {fam.name for fam in families if fam.type in SUMMED_TYPES or fam.name in PER_PROCESS_GAUGES}
    extra: dict[str, list] = {}
    for text in others:
        for fam in text_string_to_metric_families(text):
            if fam.name not in wanted:
                continue
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in summed:
                    summed[key] += s.value
                else:  # a label set only another worker has seen (a status, a backend it failed on)
                    summed[key] = s.value
                    extra.setdefault(fam.name, []).append(key)
    lines = []
    for fam in families:
        ptype = fam.type if fam.type != "unknown" else "untyped"
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        lines.append(f"# HELP {name} {fam.documentation}")
        lines.append(f"# TYPE {name} {ptype}")
        keys = [(s.name, tuple(sorted(s.labels.items()))) for s in fam.samples if not s.name.endswith("_created")]
        keys += extra.get(fam.name, [])
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
        for key in keys:
            value = summed.get(key, values.get(key))
            sname, labels = key
            lab = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{sname}{lab} {floatToGoString(value)}")
    return "\n".join(lines) + "\n"
