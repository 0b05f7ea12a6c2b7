"""Fleet simulation: the proxy's own router over N in-process emulator engines, on virtual time.

`simulate_run` sends a workload the way `loadgen run` does, but nothing leaves the process and no
wall time is waited: a `VirtualTimeLoop` jumps to the next timer whenever nothing is ready. What runs
is what `python -m proxy` and `python -m emulator` run, minus HTTP:

- the proxy's `Router` (prompt walk, policy, in-flight bookkeeping, prefix index) is built from a
  `ProxyConfig` as `create_app` builds it, and a request goes through `parse_completion`/`parse_chat`,
  `text_context`, `decide`, `begin`, `first_byte` and `end` in the order the forwarder calls them;
- its `BackendMonitor` runs its health-check and /metrics-scrape loops at the proxy's intervals
  against `SimSession`, which answers GET /health, /v1/models and /metrics from the engines (the
  metrics text is the emulator's own Prometheus exposition);
- with `kv_events`, each engine step's KV events are encoded as the emulator's publisher encodes
  them and handed to the proxy's `KVEventSubscriber` in sequence (the exact index);
- each backend is an emulator engine (`make_engine`: scheduler, block pool, latency model) fed by
  the emulator's `RequestParser`; a request's first chunk and end reach the router at the emulated
  times the engine produces them.

Determinism: the workload, arrivals, engine sampling and the router's random source are seeded,
the loop is single-threaded and time is virtual, so a seed gives the same records byte for byte.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from prometheus_client import generate_latest

from emulator.config import EmulatorConfig
from emulator.engine import Engine, make_engine
from emulator.metrics import EngineMetrics
from emulator.lora import LoraRegistry
from emulator.protocol import RequestParser, parse_json_object
from emulator.server import model_list
from kvblocks import APIError, clock, get_tokenizer
from kvblocks.kv_events import EventBatch, encode_batch, encode_seq
from proxy.backends.registry import BackendRegistry
from proxy.config import ProxyConfig
from proxy.upstream.health import BackendMonitor
from proxy.upstream.lora_loader import RuntimeLoraLoader
from proxy.index.kv_events import KVEventSource
from proxy.edge.openai_request import parse_chat, parse_completion
from proxy.routing.router import Router
from proxy.routing.tokenize_cache import ChunkedTokenizer

from .arrivals import ConcurrencyArrivals, make_arrivals
from .backend_metrics import CACHE_CONFIG, GAUGES, MetricsSample, parse_metrics
from .client import RequestRecord
from .config import RunConfig
from .runner import RunResult
from .virtual_loop import VirtualTimeLoop
from .workloads import RequestSpec, Workload

SIM_URL = "http://sim-backend-{:02d}:8000"
# The series of a /metrics exposition each reader parses (the full text's other lines are histograms
# neither reads; leaving them out makes a scrape ~20x cheaper and changes no value read).
PROXY_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", CACHE_CONFIG,
                "vllm:lora_requests_info")
LOADGEN_SERIES = (*GAUGES, *(name + "_total" for name in GAUGES), CACHE_CONFIG)
# Wall-clock runs start the clock at an arbitrary monotonic value; so does the simulation (never 0,
# so a timestamp of 0.0 meaning "never" cannot collide with a real one).
VIRTUAL_EPOCH = 1000.0


@dataclass
class FleetSpec:
    """The simulated system: N emulators of one GPU/profile behind one proxy configuration.

    By default every backend serves one model (the `model` spec's name). `served_models` splits the
    fleet between several names (`model_backends` of each, default an even split, the first names
    taking the remainder; every one sized by the `model` spec); `lora_modules` (NAME=PATH) are LoRA
    adapters, each served by `lora_copies` consecutive backends (default: all), as
    `python -m emulator --lora-modules --max-loras --lora-load-s` serves them."""

    backends: int = 4
    profile: str | None = None  # emulator latency profile (default: the emulator's)
    model: str | None = None  # emulator model spec (sizes the KV cache)
    gpu: str | None = None
    num_gpu_blocks: int | None = None
    max_model_len: int | None = None
    kv_events: bool = False
    policy_params: list[str] = field(default_factory=list)
    proxy_metrics_interval: float | None = None  # default: the proxy's
    emulator_seed: int = 0
    served_models: list[str] = field(default_factory=list)
    model_backends: list[int] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    lora_copies: int | None = None
    max_loras: int = 1
    lora_load_s: float = 0.0
    # The proxy's --lora-runtime-load: an adapter request may go to a backend of its base model without
    # the adapter, which the proxy's own loader loads there first (every simulated backend allows it).
    lora_runtime_load: bool = False
    # The real stack's fixed time a request spends outside the engines (client, proxy and backend
    # HTTP, tokenizing): a routed request reaches its engine this many emulated s later. 0 = none;
    # `simulate --against-wall` measures it, a gateway's floor can be given (--overhead-ms).
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.model_backends:
            assert len(self.model_backends) == len(self.served_models), "one backend count per served model"
            assert sum(self.model_backends) == self.backends and min(self.model_backends) >= 1, "every backend one model"
        assert self.lora_copies is None or 1 <= self.lora_copies, "an adapter is on at least one backend"
        assert self.overhead_s >= 0, "overhead is time, not negative"

    def backends_per_model(self) -> list[int]:
        """How many backends serve each of `served_models` (in order)."""
        if self.model_backends:
            return list(self.model_backends)
        n, k = self.backends, len(self.served_models)
        return [n // k + (1 if j < n % k else 0) for j in range(k)]

    def served_model(self, i: int) -> str | None:
        """The model name backend `i` serves (None: the model spec's name)."""
        if not self.served_models:
            return None
        for name, count in zip(self.served_models, self.backends_per_model()):
            if i < count:
                return name
            i -= count
        raise IndexError(i)

    def adapters(self, i: int) -> list[str]:
        """The NAME=PATH adapters backend `i` serves: adapter j is on backends j .. j+copies-1 (mod N)."""
        copies = self.lora_copies or self.backends
        return [m for j, m in enumerate(self.lora_modules) if (i - j) % self.backends < copies]

    def emulator_config(self, i: int = 0) -> EmulatorConfig:
        """Backend `i`'s configuration (its model name and adapters; every other setting is the fleet's)."""
        kw: dict[str, Any] = dict(port=0, log_requests=False, seed=self.emulator_seed)
        for name in ("profile", "model", "gpu", "num_gpu_blocks", "max_model_len"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = v
        config = EmulatorConfig(**kw)
        served = self.served_model(i)
        if served is not None:  # a name, sized by the model spec
            config = replace(config, model=served, num_gpu_blocks=config.resolved_num_gpu_blocks)
        if self.lora_modules:
            config = replace(config, enable_lora=True, lora_modules=self.adapters(i), max_loras=self.max_loras,
                             lora_load_s=self.lora_load_s)
        return config

    def proxy_config(self, strategy: str) -> ProxyConfig:
        emu = self.emulator_config()
        kw: dict[str, Any] = dict(
            backends=[SIM_URL.format(i) for i in range(self.backends)], strategy=strategy, profile=emu.profile,
            block_size=emu.block_size, hash_algo=emu.prefix_caching_hash_algo, policy_param=list(self.policy_params),
            log_level="warning", time_scale=1.0,
        )
        if self.proxy_metrics_interval is not None:
            kw["metrics_interval"] = self.proxy_metrics_interval
        if self.lora_runtime_load:
            kw["lora_runtime_load"] = True
        return ProxyConfig(**kw)


class ChunkedEncoder:
    """The built-in tokenizer with `encode` through the proxy's exact chunked cache (same ids, encoded once
    per shared chunk): the emulators' tokenizing of prompts that share long prefixes costs little."""

    def __init__(self, base) -> None:
        self._base = base
        self._chunked = ChunkedTokenizer(base)
        self.name = base.name
        self.eos_token_id = base.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._chunked.encode(text) if len(text) > 256 else self._base.encode(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class SimBackend:
    """One emulator as its HTTP server holds it: engine, metrics registry, request parser."""

    def __init__(self, url: str, config: EmulatorConfig, tokenizer) -> None:
        self.url = url
        self.config = config
        self.metrics = EngineMetrics(config)
        self.engine: Engine = make_engine(config, tokenizer, self.metrics)
        self.metrics.bind(self.engine)
        self.lora = LoraRegistry(config.model, config.lora_modules, config.max_loras)
        self.parser = RequestParser(config.model, tokenizer, config.max_model_len, self.lora.adapters,
                                    tuple(config.served_model_aliases))
        self.ids = itertools.count()
        self.finishing: dict[str, asyncio.Future[None]] = {}
        self.engine.finish_listeners.append(self._finished)
        self._next_seq = 0
        self._deliver: Callable[[list[bytes]], Any] | None = None

    def _finished(self, req) -> None:
        fut = self.finishing.pop(req.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def publish_to(self, deliver: Callable[[list[bytes]], Any]) -> None:
        """Publish each step's KV events, encoded as the emulator's ZMQ publisher encodes them, to `deliver`."""
        self._deliver = deliver
        self.engine.block_pool.use_int_hashes = True
        self.engine.set_kv_event_sink(self._publish)

    def _publish(self, events) -> None:
        if not events or self._deliver is None:
            return
        payload = encode_batch(EventBatch(ts=clock.monotonic(), events=list(events), data_parallel_rank=0))
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._deliver([b"", encode_seq(seq), payload])

    def exposition(self, series: tuple[str, ...]) -> bytes:
        """The emulator's /metrics text, restricted to `series` (same lines, same values, as the full text)."""
        return generate_latest(self.metrics.registry.restricted_registry(series))

    def models(self) -> dict[str, Any]:
        """The emulator's /v1/models body: its model, then its adapters (root = path, parent = model)."""
        return model_list(self.config, self.lora, 0)


class _Body:
    """`aiohttp`'s `response.content` as the monitor reads it: `read(n)`, at most n bytes."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self, n: int = -1) -> bytes:
        return self._body if n < 0 else self._body[:n]


class _Answer:
    """What `aiohttp`'s response gives the monitor: status, content.read(n), text(), json()."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self._body = body
        self.content = _Body(body)

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def text(self) -> str:
        return self._body.decode()

    async def json(self, loads: Callable[[Any], Any] = orjson.loads) -> Any:
        return loads(self._body)


class SimSession:
    """The proxy's client session for its monitor and adapter loader, answered by in-process emulators
    (no sockets): GET /health, /v1/models and /metrics; POST /v1/load_lora_adapter."""

    def __init__(self, backends: dict[str, SimBackend]) -> None:
        self.backends = backends

    def get(self, url: str, **_: Any) -> _Answer:
        for base, b in self.backends.items():
            if url.startswith(base):
                path = url[len(base):]
                if path in ("/health", "/ping"):
                    return _Answer(200, b"")
                if path == "/v1/models":
                    return _Answer(200, orjson.dumps(b.models()))
                if path == "/metrics":
                    return _Answer(200, b.exposition(PROXY_SERIES))
                return _Answer(404, b"")
        raise OSError(f"no simulated backend at {url}")

    def post(self, url: str, json: Any = None, **_: Any) -> _Answer:
        """vLLM's /v1/load_lora_adapter on the emulator's registry, answered as its server answers it."""
        for base, b in self.backends.items():
            if url.startswith(base):
                if url[len(base):] != "/v1/load_lora_adapter" or not isinstance(json, dict):
                    return _Answer(404, b"")
                name, path = json.get("lora_name"), json.get("lora_path")
                try:
                    b.lora.load(name if isinstance(name, str) else "", path if isinstance(path, str) else "")
                except APIError as e:
                    return _Answer(e.status, e.message.encode())
                return _Answer(200, f"Success: LoRA adapter '{name}' added successfully.".encode())
        raise OSError(f"no simulated backend at {url}")


class Fleet:
    """A proxy's routing state over simulated backends, built as `proxy.app.create_app` builds it."""

    def __init__(self, spec: FleetSpec, strategy: str, seed: int = 0) -> None:
        self.spec = spec
        tokenizer = ChunkedEncoder(get_tokenizer())
        self.backends = {SIM_URL.format(i): SimBackend(SIM_URL.format(i), spec.emulator_config(i), tokenizer)
                         for i in range(spec.backends)}
        cfg = spec.proxy_config(strategy)
        self.router = Router(cfg.routing(), BackendRegistry(cfg.new_breaker))
        self.router.env.rng.seed(repr((seed, "router")))
        for url, b in self.backends.items():
            source = KVEventSource(f"inproc://kv-events-{url.rsplit('-', 1)[-1]}") if spec.kv_events else None
            self.router.add_backend(url, source)
            if source is not None:
                sub = self.router.kv_events.subscribers[url]
                b.publish_to(lambda frames, sub=sub: asyncio.get_running_loop().create_task(sub.receive(frames)))
        session = SimSession(self.backends)
        self.monitor = BackendMonitor(self.router, session, cfg.monitoring())
        self.lora_loader = RuntimeLoraLoader(session) if spec.lora_runtime_load else None  # type: ignore[arg-type]
        self.model = spec.emulator_config(0).model
        self.strategy = self.router.strategy

    async def start(self) -> None:
        await self.monitor.check_all_health()
        self.monitor.start()

    async def stop(self) -> None:
        await self.monitor.stop()
        for b in self.backends.values():
            b.engine.abort_all()

    async def send(self, spec: RequestSpec, model: str, run_start: float) -> RequestRecord:
        """One streamed request, through the proxy's routing and one engine; never raises for request errors.
        `model` is the run's; a request naming its own (an adapter, one of several models) sends that."""
        model = spec.model or model
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rec = RequestRecord(spec.index, spec.chain, spec.turn, spec.api, t0 - run_start,
                            expected_prompt_tokens=spec.prompt_tokens, max_tokens=spec.max_tokens, tags=dict(spec.tags),
                            request_id=f"loadgen-{spec.index}")
        body: dict[str, Any] = dict(model=model, max_tokens=spec.max_tokens, stream=True,
                                    stream_options={"include_usage": True}, temperature=0.0, ignore_eos=True,
                                    min_tokens=spec.max_tokens)
        if spec.api == "chat":
            body["messages"] = spec.messages
        else:
            body["prompt"] = spec.prompt
        raw = orjson.dumps(body)
        router = self.router
        try:
            parsed = (parse_chat if spec.api == "chat" else parse_completion)(raw)
            ctx = router.text_context(parsed.text, parsed.max_tokens, parsed.model, parsed.cache_salt)
            decision = router.decide(ctx, self.strategy)
        except APIError as e:
            rec.status, rec.error = e.status, f"APIError: {e.message}"
            return rec
        b = decision.backend
        if ctx.lora is not None and self.lora_loader is not None and ctx.lora not in b.adapters:
            card = router.adapters.card(ctx.lora, router.registry)  # as the forwarder loads it first
            if card is None or not await self.lora_loader.ensure(b, card):
                rec.status, rec.error = 503, f"adapter {ctx.lora} could not be loaded on {b.url}"
                return rec
        inflight = router.begin(ctx, decision, self.strategy, stream=True)
        probe = b.breaker.attempt()
        rec.backend, rec.strategy, rec.matched_blocks = b.url, self.strategy, decision.matched_blocks
        verdict: bool | None = None
        try:
            if self.spec.overhead_s:
                await asyncio.sleep(self.spec.overhead_s)
            verdict = await self._generate(self.backends[b.url], raw, spec.api, rec, inflight, t0)
        finally:
            router.end(inflight)
            b.breaker.judge(probe, verdict)  # as the forwarder does
        return rec

    async def _generate(self, sb: SimBackend, raw: bytes, api: str, rec: RequestRecord, inflight, t0: float) -> bool:
        loop = asyncio.get_running_loop()
        try:
            body = parse_json_object(raw)
            g = sb.parser.chat(body) if api == "chat" else sb.parser.completion(body)
            k = next(sb.ids)
            er = sb.engine.make_request(f"{rec.request_id}-0-{k}", g.prompts[0], g.params, g.cache_salt,
                                        client_request_id=rec.request_id, lora=sb.lora.get(g.model))
        except APIError as e:
            rec.status, rec.error = e.status, f"BadRequestError: {e.message}"
            return True  # answered: the backend served it well (a 4xx is the client's)
        rec.status = 200
        done = loop.create_future()
        sb.finishing[er.request_id] = done
        # The engine hands every token to `er.outputs` as the HTTP server reads them; the client needs only
        # the first (the first chunk: `first_byte`) and the end, so it wakes twice instead of once per token.
        sb.engine.add_request(er)
        first = await er.outputs.get()
        if first.finish_reason != "abort":
            self.router.first_byte(inflight)
            rec.ttft = loop.time() - t0
        await done
        rec.e2e = loop.time() - t0
        if er.finish_reason in (None, "abort"):
            rec.ttft = None
            rec.error = "stream ended without a usage chunk"
            return False
        rec.finish_reason = er.finish_reason
        rec.prompt_tokens = er.num_prompt_tokens
        rec.cached_tokens = er.num_cached_tokens
        rec.completion_tokens = er.num_output_tokens
        if rec.ttft is not None and rec.completion_tokens > 1:
            rec.tpot = (rec.e2e - rec.ttft) / (rec.completion_tokens - 1)
        rec.ok = True
        return True

    def scrape(self) -> dict[str, dict[str, float]]:
        """The load generator's view of every backend's /metrics (as `backend_metrics.scrape_all`)."""
        return {url: parse_metrics(b.exposition(LOADGEN_SERIES).decode()) for url, b in self.backends.items()}

    def sample(self, t: float) -> list[MetricsSample]:
        """What `scrape` reads, taken from the same counters and gauges without rendering and parsing
        the text (a scrape of every backend twice a second cost a third of a fleet simulation);
        tests/loadgen/test_simulate.py checks the two agree."""
        out = []
        for url, b in self.backends.items():
            m, e = b.metrics, b.engine
            out.append(MetricsSample(
                t, url, running=float(e.num_running), waiting=float(e.num_waiting), kv_usage=e.kv_cache_usage(),
                prefix_hits=m.prefix_hits._value.get(), prefix_queries=m.prefix_queries._value.get(),
                requests=sum(c._value.get() for c in m.success.values()), preemptions=m.preemptions._value.get(),
                lateness_sum=m.h_lateness.sum, lateness_steps=float(m.h_lateness.count),
                block_size=float(b.config.block_size)))
        return out




async def _simulate(workload: Workload, config: RunConfig, fleet: Fleet, label: str) -> RunResult:
    loop = asyncio.get_running_loop()
    # A split fleet serves its own names, not the model spec's (which --model also sets as the run's).
    model = fleet.model if fleet.spec.served_models else (config.model or fleet.model)
    arrivals = make_arrivals(workload.name, config.rate, config.concurrency, config.workload.seed,
                             config.workload.burst_size)
    result = RunResult(label, workload, config, arrivals.describe(), model)
    await fleet.start()
    result.metrics_before = fleet.scrape()
    run_start = loop.time()
    deadline = run_start + config.duration if config.duration > 0 else None
    done = asyncio.Event()
    sampler = loop.create_task(_sample(fleet, config.metrics_interval, run_start, result.samples, done))
    records = result.records

    def past() -> bool:
        return deadline is not None and loop.time() >= deadline

    async def chain(specs: list[RequestSpec]) -> None:
        for k, spec in enumerate(specs):
            if k and spec.think_time:
                await asyncio.sleep(spec.think_time)
            if past():
                return
            records.append(await fleet.send(spec, model, run_start))

    chains = workload.chains()
    tasks: list[asyncio.Task] = []
    if isinstance(arrivals, ConcurrencyArrivals):
        queue = list(reversed(chains))

        async def worker() -> None:
            while queue and not past():
                await chain(queue.pop())

        tasks = [loop.create_task(worker()) for _ in range(min(arrivals.concurrency, len(chains)))]
    else:
        for c, st in sorted(zip(chains, arrivals.start_times(chains)), key=lambda cs: cs[1]):
            delay = run_start + st - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if past():
                break
            tasks.append(loop.create_task(chain(c)))
    if tasks:
        await asyncio.gather(*tasks)
    result.duration = loop.time() - run_start
    done.set()
    await sampler
    result.metrics_after = fleet.scrape()
    await fleet.stop()
    result.stopped_by_duration = deadline is not None and len(records) < len(workload.requests)
    records.sort(key=lambda r: r.index)
    return result


async def _sample(fleet: Fleet, interval: float, run_start: float, out: list[MetricsSample], done: asyncio.Event) -> None:
    """The load generator's MetricsSampler: every backend's /metrics every `interval` s until the run ends."""
    loop = asyncio.get_running_loop()
    while not done.is_set():
        out.extend(fleet.sample(loop.time() - run_start))
        try:
            await asyncio.wait_for(done.wait(), interval)
        except asyncio.TimeoutError:
            pass


def simulate_run(workload: Workload, config: RunConfig, spec: FleetSpec, strategy: str, label: str = "") -> RunResult:
    """Run `workload` on a fresh simulated fleet routed by `strategy`; latencies in emulated seconds."""
    config = replace(config, time_scale=1.0, target="")
    loop = VirtualTimeLoop(VIRTUAL_EPOCH)
    try:
        with clock.installed(loop.time):
            fleet = Fleet(spec, strategy, config.workload.seed)
            return loop.run_until_complete(_simulate(workload, config, fleet, label or fleet.strategy))
    finally:
        loop.close()
