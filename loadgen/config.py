"""Every load-generator setting in one place: defaults here, overridable by env vars and CLI flags.

Precedence is CLI flag > `KVROUTE_LOADGEN_<FIELD>` env var > the defaults below, which reproduce
the A100-40GB / Llama-2-13B setup (max_model_len 4096) the emulator models by default.
All timing settings (rate, think time, trace timestamps) are in emulated GPU seconds. `time_scale`
has the emulator's meaning (wall seconds per emulated second; 0.1 = emulators 10x faster): the
runner multiplies every wait by it, so a run against time-scaled emulators is the same scenario.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from importlib.resources import files
from typing import Any

from kvblocks.cli import UsageError, coerce

from .validity import DEFAULT_LATENESS_LIMIT

ENV_PREFIX = "KVROUTE_LOADGEN_"
TRACE_FILE = "mooncake_fast25_conversation_trace.jsonl"
# Shipped inside the package (Apache-2.0, source and licence in loadgen/data/), so `trace` runs from a clone.
DEFAULT_TRACE = str(files("loadgen").joinpath("data", TRACE_FILE))
WORKLOAD_NAMES = ("rag", "multiturn", "sysprompt", "prefix-sweep", "tenants", "trace", "burst", "mixed",
                  "rotating-prefix", "lora", "multimodel", "b2b-saas")
# llm-d's precise prefix-cache benchmark (llm-d-kv-cache-manager benchmarking/73-capacity): a 50 s warm-up at
# 15 QPS (one full set of 750 prompts), then Poisson stages ramping 3 -> 60 QPS; RATE:SECONDS each.
B2B_STAGES = ("15:50,3:20,10:20,15:20,20:38,22:34,25:30,30:25,35:21,40:38,43:36,46:33,49:30,52:29,55:27,"
              "57:26,60:25")


@dataclass
class WorkloadConfig:
    """What the requests look like; together with `seed` it fixes every prompt's text."""

    name: str = "rag"
    seed: int = 0
    requests: int = 200
    output_tokens: int = 64
    max_model_len: int = 4096
    # rag
    documents: int = 16
    doc_tokens_min: int = 1000
    doc_tokens_max: int = 4000
    zipf_s: float = 1.1
    question_tokens: int = 48
    # multiturn
    sessions: int = 0
    turns: int = 6
    turn_tokens: int = 96
    think_time: float = 2.0
    # sysprompt
    system_prompts: int = 3
    system_tokens: int = 600
    few_shot: int = 3
    # prefix-sweep
    prefix_lengths: tuple[int, ...] = (0, 16, 64, 256, 1024, 4096)
    # tenants
    tenants: int = 12
    tenant_tokens: int = 2500
    users_per_tenant: int = 4
    # burst: short shared prefixes that fit every cache, same-prefix requests arriving together
    burst: int = 0  # requests per burst under --rate (0: 8 for the burst workload, 1 = plain Poisson otherwise)
    burst_prefixes: int = 10
    burst_prefix_tokens: int = 1000
    burst_suffix_tokens: int = 128
    # mixed: shares of rag / chat / unique requests (the rest is unique prompts)
    mixed_rag: float = 0.4
    mixed_chat: float = 0.3
    # rotating-prefix: one shared prefix at a time, replaced by a new one every `rotate_after` requests
    rotate_prefix_tokens: int = 1000
    rotate_after: int = 30
    rotate_suffix_tokens: int = 32
    # lora: adapters `<lora_prefix>0..K-1` (Zipf popularity, zipf_s) over a shared base preamble
    adapters: int = 4
    lora_prefix: str = "lora-"
    base_tokens: int = 400
    # multimodel: the models requests name (Zipf popularity, zipf_s), each with system_prompts of its own
    models: tuple[str, ...] = ()
    # b2b-saas: llm-d's precise prefix-cache benchmark (150 customers x 6,000-token context, 5 users each with
    # a 1,200-token question, 1,000 output tokens with ignore_eos, Poisson stages 3 -> 60 QPS)
    b2b_customers: int = 150
    b2b_context_tokens: int = 6000
    b2b_users: int = 5
    b2b_question_tokens: int = 1200
    b2b_output_tokens: int = 1000
    b2b_stages: str = B2B_STAGES
    b2b_stage_scale: float = 1.0
    # trace
    trace_path: str = DEFAULT_TRACE
    trace_offset: int = 0
    trace_speedup: float = 1.0
    trace_max_output: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOAD_NAMES:
            raise ValueError(f"unknown workload {self.name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
        if self.requests <= 0:
            raise ValueError("requests must be positive")
        if self.output_tokens < 1 or self.max_model_len < 2 or self.trace_speedup <= 0:
            raise ValueError("output_tokens must be >= 1, max_model_len >= 2 and trace_speedup > 0")
        for name in ("documents", "doc_tokens_min", "turns", "system_prompts", "tenants", "users_per_tenant", "adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("zipf_s", "question_tokens", "sessions", "turn_tokens", "think_time", "system_tokens", "few_shot",
                     "tenant_tokens", "trace_offset", "trace_max_output"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if any(n < 0 for n in self.prefix_lengths):
            raise ValueError("prefix_lengths must be >= 0")
        if self.doc_tokens_min > self.doc_tokens_max:
            raise ValueError("doc_tokens_min must not exceed doc_tokens_max")
        if self.name == "trace" and not os.path.isfile(self.trace_path):
            raise ValueError(f"trace_path {self.trace_path}: no such file")
        if self.rotate_after < 1 or self.rotate_prefix_tokens < 0 or self.rotate_suffix_tokens < 1:
            raise ValueError("rotate_after and rotate_suffix_tokens must be >= 1, rotate_prefix_tokens >= 0")
        if self.name == "multimodel" and not self.models:
            raise ValueError("the multimodel workload needs models (--models A,B)")
        if self.base_tokens < 0 or not self.lora_prefix:
            raise ValueError("base_tokens must be >= 0 and lora_prefix non-empty")
        if self.burst < 0:
            raise ValueError("burst must not be negative")
        for name in ("b2b_customers", "b2b_users", "b2b_question_tokens", "b2b_output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.b2b_context_tokens < 0:
            raise ValueError("b2b_context_tokens must be >= 0")
        if not self.b2b_stage_scale > 0:
            raise ValueError("b2b_stage_scale must be > 0")
        parse_stages(self.b2b_stages)
        if not (0 <= self.mixed_rag and 0 <= self.mixed_chat and self.mixed_rag + self.mixed_chat <= 1):
            raise ValueError("mixed_rag and mixed_chat must be shares summing to at most 1")

    @property
    def b2b_stage_list(self) -> list[tuple[float, float]]:
        """`b2b_stages` as (rate per s, seconds) pairs."""
        return parse_stages(self.b2b_stages)

    @property
    def burst_size(self) -> int:
        """Requests per burst of arrivals."""
        return self.burst or (8 if self.name == "burst" else 1)


def parse_stages(text: str) -> list[tuple[float, float]]:
    """RATE:SECONDS,... as (rate per s, seconds) pairs; ValueError names b2b_stages."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            rate, seconds = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"b2b_stages: {part!r} is not RATE:SECONDS") from None
        if rate <= 0 or seconds <= 0:
            raise ValueError(f"b2b_stages: {part!r} needs a positive rate and duration")
        out.append((rate, seconds))
    if not out:
        raise ValueError("b2b_stages needs at least one RATE:SECONDS stage")
    return out


@dataclass
class RunConfig:
    """How the requests are sent: target, arrival process, bounds and where results go."""

    target: str = "http://127.0.0.1:8000/v1"
    # More replicas of the same proxy (comma-separated base URLs): requests go round robin over target and these.
    also_targets: str = ""
    out: str = "loadgen-results"
    rate: float = 0.0
    concurrency: int = 0
    duration: float = 0.0
    time_scale: float = 1.0
    model: str = ""
    api_key: str = "EMPTY"
    admin_key: str = ""
    request_timeout: float = 300.0
    metrics_interval: float = 0.5
    # A run whose failed share of requests exceeds this makes the CLI exit 1 (all failing must not look fine).
    max_error_share: float = 0.05
    # Mean emulated seconds the emulators' steps (or our own arrivals) may run late before the run is
    # marked invalid: past it the machine, not the strategy, sets the latencies (loadgen.validity).
    lateness_limit: float = DEFAULT_LATENESS_LIMIT
    log_format: str = "console"
    progress: bool = True
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def __post_init__(self) -> None:
        if self.rate < 0 or self.concurrency < 0:
            raise ValueError("rate and concurrency must not be negative")
        if self.rate > 0 and self.concurrency > 0:
            raise ValueError("give either a rate or a concurrency, not both")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.log_format not in ("console", "json"):
            raise ValueError(f"log_format must be console or json, not {self.log_format!r}")
        if self.lateness_limit < 0:
            raise ValueError("lateness_limit must be >= 0 (0 = never mark a run invalid)")
        if not 0 <= self.max_error_share <= 1:
            raise ValueError("max_error_share must be within [0, 1]")
        if self.request_timeout <= 0 or self.metrics_interval <= 0 or self.duration < 0:
            raise ValueError("request_timeout and metrics_interval must be > 0, duration >= 0")

    def targets(self) -> list[str]:
        """Every URL requests are spread over, round robin: `target` first."""
        return [self.target, *(u.strip() for u in self.also_targets.split(",") if u.strip())]

    @property
    def load_description(self) -> str:
        """The load level in words, for reports."""
        if self.workload.name == "trace" and not self.rate and not self.concurrency:
            return f"trace timestamps at {self.workload.trace_speedup:g}x speed-up (emulated time)"
        if self.workload.name == "b2b-saas" and not self.rate and not self.concurrency:
            return (f"Poisson stages {self.workload.b2b_stages} (RATE:SECONDS, durations x "
                    f"{self.workload.b2b_stage_scale:g}; emulated time)")
        if self.rate > 0:
            return f"Poisson arrivals at {self.rate:g} req/s (emulated time)"
        if self.concurrency > 0:
            return f"fixed concurrency {self.concurrency}"
        return "fixed concurrency 1"


def _coerce(name: str, value: str, like: Any) -> Any:
    if isinstance(like, bool):
        return coerce(name, value, bool)
    if isinstance(like, (int, float)):
        return coerce(name, value, type(like))
    if isinstance(like, tuple):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise UsageError(f"{name}={value!r}", "expected comma-separated integers") from None
    return value


def env_overrides(cls: type, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Values for `cls`'s fields taken from `KVROUTE_LOADGEN_<FIELD>` env vars (UsageError names a bad one)."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    defaults = cls()
    for f in fields(cls):
        key = ENV_PREFIX + f.name.upper()
        if key in environ and f.name != "workload":
            out[f.name] = _coerce(key, environ[key], getattr(defaults, f.name))
    return out
