"""vLLM's Prometheus metrics (names, labels, buckets of `vllm/v1/metrics/loggers.py`) for one emulator.

Each emulator has its own registry, so replicas in one process never share series. Times are in
emulated seconds, so a scrape looks like the modelled GPU whatever the time scale.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from .config import EmulatorConfig
    from .engine import Engine
    from .request import EngineRequest

# vLLM exposes no `_created` series; this switch is process-wide in prometheus_client.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISHED_REASONS = ("stop", "length", "abort", "error")
LORA_INFO_SERIES = 64


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(v)
        exp += 1


class FastHistogram:
    """A histogram for one fixed label set, observed without locks (the engine is single-threaded).

    prometheus_client's Histogram takes a lock and walks its buckets per observation; the engine
    observes once per generated token, for hundreds of streams per step.
    """

    def __init__(self, name: str, doc: str, buckets: Sequence[float], labels: dict[str, str],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.upper = [float(b) for b in buckets] + [float("inf")]
        self.counts = [0] * len(self.upper)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.upper, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cum = 0
        buckets = []
        for ub, c in zip(self.upper, self.counts):
            cum += c
            buckets.append((floatToGoString(ub), cum))
        fam.add_metric(list(self.labels.values()), buckets, self.sum)
        yield fam


class LoraInfoCollector:
    """vllm:lora_requests_info as vLLM 0.32 exposes it: labels max_lora and the running and waiting
    adapters (comma-joined), no model_name/engine; the value is the time the label set was last
    current (`set_to_current_time`), and a label set once seen stays exposed, so a reader takes the
    newest sample. Here the current set is taken at scrape time; at most LORA_INFO_SERIES are kept."""

    def __init__(self, engine: Engine, max_loras: int) -> None:
        self.engine = engine
        self.max_loras = str(max_loras)
        self.seen: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import time

        running, waiting = self.engine.running_loras()
        key = (",".join(running), ",".join(waiting))
        self.seen.pop(key, None)
        self.seen[key] = time.time()
        while len(self.seen) > LORA_INFO_SERIES:
            del self.seen[next(iter(self.seen))]
        fam = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        for (run, wait), t in self.seen.items():
            fam.add_metric([self.max_loras, run, wait], t)
        yield fam


class EngineMetrics:
    """The engine's hooks into vLLM-named series; gauges read the engine at scrape time."""

    def __init__(self, config: EmulatorConfig, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": config.model, "engine": "0"}
        self.lora_enabled = config.enable_lora or bool(config.lora_modules)
        self.max_loras = config.max_loras
        names = list(self.labels)
        r = self.registry

        def hist(name: str, doc: str, buckets) -> FastHistogram:
            return FastHistogram(name, doc, buckets, self.labels, r)

        def counter(name: str, doc: str):
            return Counter(name, doc, names, registry=r).labels(**self.labels)

        self._running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", names, registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", names, registry=r)
        self._usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", names, registry=r)
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          names + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(**self.labels, finished_reason=reason) for reason in FINISHED_REASONS}
        len_buckets = build_1_2_5_buckets(config.max_model_len)
        self.h_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", len_buckets)
        self.h_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                 len_buckets)
        self.h_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                 len_buckets)
        self.h_iteration = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                ITERATION_TOKEN_BUCKETS)
        self.h_ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                           TTFT_BUCKETS)
        self.h_itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                          ITL_BUCKETS)
        self.h_tpot = hist("vllm:request_time_per_output_token_seconds",
                           "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.h_e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                          REQUEST_LATENCY_BUCKETS)
        self.h_queue = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                            REQUEST_LATENCY_BUCKETS)
        self.h_inference = hist("vllm:request_inference_time_seconds",
                                "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.h_prefill = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                              REQUEST_LATENCY_BUCKETS)
        self.h_decode = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                             REQUEST_LATENCY_BUCKETS)
        # Not a vLLM series: wall seconds each engine step ended after its due time (is the emulator keeping up?).
        self.h_lateness = hist("kvroute:emulator_step_lateness_seconds",
                               "Wall seconds an emulated engine step finished after its scheduled time.",
                               LATENESS_BUCKETS)
        info = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": str(config.gpu_memory_utilization),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(config.resolved_num_gpu_blocks),
            "num_gpu_blocks_override": str(config.num_gpu_blocks),
            "prefix_caching_hash_algo": config.prefix_caching_hash_algo,
            "sliding_window": "None",
        }
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", names + list(info),
              registry=r).labels(**self.labels, **info).set(1)

    def bind(self, engine: Engine) -> None:
        """Read running/waiting/usage from the engine whenever Prometheus scrapes."""
        if self.lora_enabled and hasattr(engine, "running_loras"):
            self.registry.register(LoraInfoCollector(engine, self.max_loras))
        self._running.labels(**self.labels).set_function(lambda: engine.num_running)
        self._waiting.labels(**self.labels).set_function(lambda: engine.num_waiting)
        self._usage.labels(**self.labels).set_function(engine.kv_cache_usage)

    def on_admitted(self, req: EngineRequest, looked_up: bool = True) -> None:
        if looked_up:
            self.prefix_queries.inc(req.num_prompt_tokens)
            self.prefix_hits.inc(req.num_cached_tokens)
        self.prompt_tokens.inc(req.num_prompt_tokens)

    def on_generated(self, num_tokens: int) -> None:
        """Tokens generated in one engine step (counted once per step, not per token)."""
        self.generation_tokens.inc(num_tokens)

    def on_token(self, req: EngineRequest, t: float, prev_t: float | None) -> None:
        if prev_t is None:
            self.h_ttft.observe(t - req.timings.arrival)
        else:
            self.h_itl.observe(t - prev_t)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_step(self, num_tokens: int) -> None:
        self.h_iteration.observe(num_tokens)

    def on_step_lateness(self, wall_seconds: float) -> None:
        self.h_lateness.observe(max(0.0, wall_seconds))

    def on_finished(self, req: EngineRequest) -> None:
        self.success.get(req.finish_reason or "error", self.success["error"]).inc()
        tm = req.timings
        self.h_prompt.observe(req.num_prompt_tokens)
        self.h_generation.observe(req.num_output_tokens)
        self.h_max_tokens.observe(req.params.max_tokens)
        if tm.first_token is None or tm.finished is None or tm.first_scheduled is None:
            return
        self.h_e2e.observe(tm.finished - tm.arrival)
        self.h_queue.observe(tm.first_scheduled - tm.arrival)
        self.h_prefill.observe(tm.first_token - tm.first_scheduled)
        self.h_decode.observe(tm.finished - tm.first_token)
        self.h_inference.observe(tm.finished - tm.first_scheduled)
        if req.num_output_tokens > 1:
            self.h_tpot.observe((tm.finished - tm.first_token) / (req.num_output_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
