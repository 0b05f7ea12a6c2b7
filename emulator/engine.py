"""Engines that turn requests into timed token streams over the block pool.

`BatchedEngine` mirrors vLLM v1's scheduler: a token budget per step, running requests first
(decodes, then the rest of prefills in chunks), FCFS admission when the whole sequence's uncached
blocks are free, preemption of the newest request when a running one needs a block, KV events
published once per step, and a step time from the latency profile for what the step computed,
paced on an absolute clock. `SimpleEngine` is the seed's independent per-request model.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvblocks import APIError, Tokenizer, clock, extra_keys, get_tokenizer, salt_extra_keys
from kvblocks.kv_events import KVEvent

from .block_pool import BlockPool
from .config import EmulatorConfig
from .detokenizer import OutputText
from .output_length import parse_length_distribution
from .generator import TokenGenerator
from .kv_cache_manager import KVCacheManager, KVSequence, cdiv
from kvblocks.latency import LatencyProfile, get_profile
from .request import EngineRequest, RequestStatus, SamplingParams, TokenOutput

if TYPE_CHECKING:
    from .lora import Adapter
    from .metrics import EngineMetrics

KVEventSink = Callable[[list[KVEvent]], None]
TIMER_BIAS_MAX_S = 0.002
TIMER_BIAS_GAIN = 0.1


class Engine:
    """What both engines share: pool, cache manager, generator, emulated clock, token emission."""

    def __init__(
        self,
        config: EmulatorConfig,
        tokenizer: Tokenizer | None = None,
        metrics: EngineMetrics | None = None,
        profile: LatencyProfile | None = None,
    ) -> None:
        self.config = config
        self.profile = profile or get_profile(config.profile)
        self.time_scale = config.time_scale
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len
        self.block_pool = BlockPool(config.resolved_num_gpu_blocks, config.block_size)
        self.kv_cache_manager = KVCacheManager(self.block_pool, config.prefix_caching_hash_algo)
        self.tokenizer = tokenizer or get_tokenizer()
        self.generator = TokenGenerator(self.tokenizer, config.seed, config.eos_probability)
        self.natural_lengths = parse_length_distribution(config.natural_length)
        self.metrics = metrics
        self.requests: dict[str, EngineRequest] = {}
        self.num_preemptions = 0
        self.finish_listeners: list[Callable[[EngineRequest], None]] = []
        self._kv_event_sink: KVEventSink | None = None
        self.waiting: deque[EngineRequest] = deque()
        self.running: Collection[EngineRequest] = ()
        self._wall0 = clock.monotonic()
        self._timer_bias = 0.0

    # --- clock -----------------------------------------------------------------------------
    def emu_now(self) -> float:
        """Emulated seconds since the engine started (wall time divided by the time scale)."""
        return (clock.monotonic() - self._wall0) / self.time_scale

    async def sleep_until(self, emu_t: float) -> None:
        """Wait until emulated time `emu_t` on the wall clock.

        Event-loop timers fire late by a loop-specific amount (ms-granular: ~0.3 ms for uvloop,
        ~0.9 ms for asyncio); the engine learns that bias from its own wake-ups and starts each
        timer that much early, instead of busy-waiting.
        """
        target = self._wall0 + emu_t * self.time_scale
        delay = target - clock.monotonic()
        if delay <= self._timer_bias:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(delay - self._timer_bias)
        late = clock.monotonic() - target
        step = max(-TIMER_BIAS_MAX_S, min(TIMER_BIAS_MAX_S, late))  # a CPU-starved wake-up is not timer bias
        self._timer_bias = max(0.0, min(TIMER_BIAS_MAX_S, self._timer_bias + TIMER_BIAS_GAIN * step))

    # --- state others read -----------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def kv_cache_usage(self) -> float:
        return self.block_pool.get_usage()

    # --- KV events -------------------------------------------------------------------------
    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        """Receive each step's KV events (evictions before the stores that caused them)."""
        self._kv_event_sink = sink
        self.block_pool.enable_kv_events = sink is not None

    def flush_kv_events(self) -> None:
        """Hand pending events to the sink as one batch (the batched engine calls it once per step)."""
        if self._kv_event_sink is not None:
            events = self.block_pool.take_events()
            if events:
                self._kv_event_sink(events)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Forget every cached block (False while requests hold blocks, unless they are preempted
        first). As in vLLM, the AllBlocksCleared event is queued for the next step's batch."""
        if reset_running_requests:
            self._preempt_all()
        return self.kv_cache_manager.reset_prefix_cache()

    def _preempt_all(self) -> None:
        """Release every running request's blocks so they recompute (only the batched engine can)."""

    # --- requests --------------------------------------------------------------------------
    def make_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        client_request_id: str | None = None,
        lora: Adapter | None = None,
    ) -> EngineRequest:
        """Build a request, rejecting (APIError 400) one that could never fit the KV cache. With `lora`
        it runs on that adapter: every block hashes with the adapter's key (`kvblocks.extra_keys`)."""
        prompt = list(prompt_token_ids)
        if len(prompt) + params.max_tokens > self.max_model_len:
            # The API layer refuses these first; the start-up check guarantees max_model_len fits the cache.
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the messages, {params.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        if request_id in self.requests:
            raise APIError(400, f"request id {request_id!r} is already in flight", param="request_id")
        seq = KVSequence(
            request_id, list(prompt),
            extra_keys_block0=salt_extra_keys(cache_salt),
            event_extra_keys_block0=(cache_salt,) if cache_salt else None,
            skip_prefix_cache=params.prompt_logprobs is not None,
            keys=extra_keys(lora.key, cache_salt) if lora is not None else None,
            lora_name=lora.name if lora is not None else None,
            lora_id=lora.id if lora is not None else None,
        )
        natural = None
        if not params.max_tokens_set and not params.ignore_eos:  # a model's own end of answer (output_length)
            natural = self.natural_lengths.draw(self.generator.length_rng(prompt, params.seed))
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            seq=seq,
            generator=self.generator.for_prompt(prompt, params.seed),
            text=OutputText(params.stop, params.include_stop_str_in_output),
            client_request_id=client_request_id or request_id,
            natural_length=natural,
        )

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenOutput]:
        """Run `req` and yield its tokens; closing or cancelling the iterator aborts it at once."""
        self.add_request(req)
        try:
            while True:
                out = await req.outputs.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                self.abort(req.request_id)

    def add_request(self, req: EngineRequest) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    # --- token emission shared by both engines ---------------------------------------------
    def _admit_head(self) -> tuple[EngineRequest, int] | None:
        """Allocate the head waiting request's uncached prompt blocks if they fit (FCFS: nobody
        overtakes it; like vLLM, no slot is reserved for the first output token); returns it with
        its cached-token count, or None."""
        mgr = self.kv_cache_manager
        req = self.waiting[0]
        hits, cached = mgr.get_computed_blocks(req.seq)
        if not mgr.can_admit(req.seq, hits):
            return None
        mgr.allocate_slots(req.seq, req.seq.num_tokens - cached, hits)
        self.waiting.popleft()
        return req, cached

    def _record_admission(self, req: EngineRequest, num_cached_tokens: int, t: float) -> None:
        if req.timings.first_scheduled is None:
            req.timings.first_scheduled = t
        if not req.counted_query:
            req.counted_query = True
            req.num_cached_tokens = num_cached_tokens
            looked_up = not req.seq.skip_prefix_cache  # vLLM leaves requests that skip the cache out of its stats
            if looked_up:
                self.kv_cache_manager.record_query(req.num_prompt_tokens, num_cached_tokens)
            if self.metrics is not None:
                self.metrics.on_admitted(req, looked_up)

    def _emit_token(self, req: EngineRequest, t: float) -> TokenOutput:
        """Sample the next token at emulated time `t`, apply stop rules, deliver it, finish if due."""
        p = req.params
        n_before = req.num_output_tokens
        allow_eos = not p.ignore_eos and n_before >= p.min_tokens
        if allow_eos and req.natural_length is not None and n_before + 1 >= req.natural_length:
            tok = self.tokenizer.eos_token_id  # the answer's natural end (not before min_tokens, as vLLM)
        else:
            tok = req.generator.next_token(allow_eos)
        req.output_token_ids.append(tok)
        req.seq.token_ids.append(tok)
        n = n_before + 1
        prev_t = req.timings.last_token
        if req.timings.first_token is None:
            req.timings.first_token = t
        req.timings.last_token = t
        req.token_times.append(t)
        finish: str | None = None
        stop_reason: str | int | None = None
        if allow_eos and tok == self.tokenizer.eos_token_id:
            finish = "stop"
        elif tok in p.stop_token_ids and n > p.min_tokens:
            finish, stop_reason = "stop", tok
        else:
            hit = req.text.append(self.generator.token_text(tok), check_stop=n > p.min_tokens)
            if hit is not None:
                finish, stop_reason = "stop", hit
        if finish is None and (n >= p.max_tokens or req.seq.num_tokens >= self.max_model_len):
            finish = "length"
        if self.metrics is not None:
            self.metrics.on_token(req, t, prev_t)
        out = TokenOutput(
            request_id=req.request_id,
            token_id=tok,
            text=req.text.take_delta(finish is not None),
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=n,
            finish_reason=finish,
            stop_reason=stop_reason,
        )
        if finish is not None:
            self._finish(req, finish, stop_reason, t)
        req.outputs.put_nowait(out)
        return out

    def _abort_request(self, req: EngineRequest, t: float) -> None:
        """Finish `req` as aborted and wake its consumer, if it still has one, with a final output."""
        self._finish(req, "abort", None, t)
        req.outputs.put_nowait(
            TokenOutput(req.request_id, None, req.text.take_delta(True), req.num_prompt_tokens,
                        req.num_cached_tokens, req.num_output_tokens, "abort")
        )

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)

    def _finish(self, req: EngineRequest, reason: str, stop_reason: str | int | None, t: float) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.timings.finished = t
        self.kv_cache_manager.free(req.seq)
        self.requests.pop(req.request_id, None)
        if self.metrics is not None:
            self.metrics.on_finished(req)
        for listener in self.finish_listeners:
            listener(req)


@dataclass
class ScheduledChunk:
    """Prompt (or recomputed) tokens one request computes in a step, after `context` computed ones."""

    req: EngineRequest
    num_tokens: int
    context: int


@dataclass
class SchedulerStep:
    """What one engine step computes: prefill chunks within the token budget, and one-token decodes."""

    prefills: list[ScheduledChunk] = field(default_factory=list)
    decodes: list[EngineRequest] = field(default_factory=list)
    order: list[EngineRequest] = field(default_factory=list)  # every scheduled request, in scheduling order
    preempted: bool = False

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills) + len(self.decodes)

    def cost(self, block_size: int) -> tuple[int, int]:
        """(prefill blocks, chunk-to-context block pairs) the latency profile charges."""
        blocks = pairs = 0
        for c in self.prefills:
            b = cdiv(c.num_tokens, block_size)
            blocks += b
            pairs += b * (c.context // block_size)
        return blocks, pairs


class BatchedEngine(Engine):
    """Continuous batching like vLLM v1's scheduler; runs a step loop only while there is work.

    Each step has a token budget (max_num_batched_tokens). Running requests are served first, in
    order: a decode takes one token, a request still prefilling takes the rest of its prompt up to
    what is left of the budget (chunked prefill); a running request that needs a block when none is
    free preempts the newest running request (recompute). Then, if nobody was preempted, waiting
    requests are admitted FCFS while the budget lasts and fewer than max_num_seqs run; admission
    needs the whole sequence's uncached blocks free (vLLM's scheduler_reserve_full_isl), with no
    slot reserved for the first output token. A request's token is sampled only at the end of the
    step that completes its prompt.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_num_seqs = self.config.max_num_seqs
        self.max_num_batched_tokens = self.config.resolved_max_num_batched_tokens
        self.max_loras = self.config.max_loras
        self._lora_slots: OrderedDict[str, None] = OrderedDict()  # adapters loaded in the GPU slots, LRU first
        self.running: list[EngineRequest] = []
        self.num_steps = 0
        self._clock = 0.0
        self._live = False
        self._task: asyncio.Task[None] | None = None
        self._in_step = False
        self._held_events: list[KVEvent] | None = None  # the running step's events, when a reset came mid-step

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        # vLLM resets between steps: a step already running publishes its own events, and the
        # AllBlocksCleared opens the next step's batch.
        if self._in_step and self._held_events is None:
            self._held_events = self.block_pool.take_events()
        return super().reset_prefix_cache(reset_running_requests)

    def _flush_step_events(self) -> None:
        held, self._held_events = self._held_events, None
        if held is None:
            self.flush_kv_events()
        elif held and self._kv_event_sink is not None:
            self._kv_event_sink(held)

    def add_request(self, req: EngineRequest) -> None:
        # A request that arrives while the loop runs behind its clock (starved of CPU) counts as
        # arriving at the step boundary: no step is ever scheduled before its requests arrived.
        now = self.emu_now()
        req.timings.arrival = min(now, self._clock) if self._live else now
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._abort_request(req, self.emu_now())
        return True

    async def _run(self) -> None:
        try:
            # An idle engine starts its clock at the arrival of the request that woke it, so an
            # isolated request's emulated TTFT is exactly the profile's figure.
            if self.waiting:
                self._clock = max(self._clock, self.waiting[0].timings.arrival)
                for r in self.waiting:  # arrived in the same loop tick, before the first step began
                    r.timings.arrival = min(r.timings.arrival, self._clock)
            self._live = True
            while self.waiting or self.running:
                step = self.schedule()
                if step.empty:
                    self.flush_kv_events()
                    if not step.preempted:
                        self._reject_unschedulable()
                    await asyncio.sleep(0)
                    continue
                blocks, pairs = step.cost(self.block_size)
                duration = self.profile.step_time(blocks, bool(step.prefills), len(step.decodes), pairs)
                duration += self._lora_loads(step) * self.config.lora_load_s
                self._clock += duration
                self.num_steps += 1
                if self.metrics is not None:
                    self.metrics.on_step(step.num_tokens)
                self._in_step = True
                try:
                    await self.sleep_until(self._clock)
                finally:
                    self._in_step = False
                if self.metrics is not None:
                    self.metrics.on_step_lateness(clock.monotonic() - (self._wall0 + self._clock * self.time_scale))
                self.complete(step, self._clock)
                # vLLM publishes a step's events (with any queued between steps) after the step ran.
                self._flush_step_events()
            self.flush_kv_events()
        finally:
            self._live = False
            self._task = None

    def _lora_loads(self, step: SchedulerStep) -> int:
        """Adapters this step brings into one of the max_loras slots (least recently used out)."""
        slots = self._lora_slots
        loads = 0
        for req in step.order:
            name = req.seq.lora_name
            if name is None:
                continue
            if name in slots:
                slots.move_to_end(name)
                continue
            loads += 1
            slots[name] = None
            if len(slots) > self.max_loras:
                slots.popitem(last=False)
        return loads

    def running_loras(self) -> tuple[list[str], list[str]]:
        """(adapters of running requests, adapters of waiting ones), as vllm:lora_requests_info labels them."""
        run = dict.fromkeys(r.seq.lora_name for r in self.running if r.seq.lora_name is not None)
        wait = dict.fromkeys(r.seq.lora_name for r in self.waiting if r.seq.lora_name is not None)
        return list(run), list(wait)

    def schedule(self) -> SchedulerStep:
        """Pick this step's work (vLLM's Scheduler.schedule for one full-attention group, FCFS)."""
        mgr = self.kv_cache_manager
        step = SchedulerStep()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            seq = req.seq
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget,
                          self.max_model_len - seq.num_computed_tokens - 1)
            if num_new <= 0:
                i += 1
                continue
            context = seq.num_computed_tokens
            while not mgr.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                step.preempted = True
                if victim is req:
                    break
            else:
                if req.prefilling:
                    step.prefills.append(ScheduledChunk(req, num_new, context))
                else:
                    step.decodes.append(req)
                step.order.append(req)
                budget -= num_new
                i += 1
                continue
            break
        if step.preempted:
            return step
        # vLLM's scheduler: at most max_loras distinct adapters in a step; a waiting request whose
        # adapter would be one too many is skipped (it keeps its place), the ones behind it may go.
        loras = {r.seq.lora_name for r in self.running if r.seq.lora_name is not None}
        skipped: list[EngineRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            seq = req.seq
            if seq.lora_name is not None and seq.lora_name not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            hits, cached = mgr.get_computed_blocks(seq)
            if not mgr.can_admit(seq, hits):
                break
            num_new = min(seq.num_tokens - cached, budget)
            if not mgr.allocate_slots(seq, num_new, hits):
                break
            if seq.lora_name is not None:
                loras.add(seq.lora_name)
            self.waiting.popleft()
            self._record_admission(req, cached, self._clock)
            req.status = RequestStatus.RUNNING
            req.prefilling = True
            self.running.append(req)
            step.prefills.append(ScheduledChunk(req, num_new, cached))
            step.order.append(req)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return step

    def complete(self, step: SchedulerStep, t: float) -> None:
        """End a step at emulated time `t`: requests whose prompt is now computed, and decodes, get a
        token, in scheduling order (vLLM's update_from_output: the order finished requests free blocks)."""
        emitted = 0
        for req in step.order:
            if req.status is RequestStatus.RUNNING and req.seq.num_computed_tokens >= req.seq.num_tokens:
                req.prefilling = False
                self._emit_token(req, t)
                emitted += 1
        if self.metrics is not None:
            self.metrics.on_generated(emitted)
        if any(r.finished for r in self.running):
            self.running = [r for r in self.running if not r.finished]

    def _preempt(self, req: EngineRequest) -> None:
        """Free a running request's blocks and requeue it at the front to recompute later."""
        self.kv_cache_manager.free(req.seq)
        req.status = RequestStatus.PREEMPTED
        req.prefilling = False
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        if self.metrics is not None:
            self.metrics.on_preemption()

    def _preempt_all(self) -> None:
        while self.running:  # newest first, so they return to the waiting queue in FIFO order
            self._preempt(self.running.pop())

    def _reject_unschedulable(self) -> None:
        """Nothing fits although nothing runs: the head request can never run, so fail it."""
        if self.running or not self.waiting:
            return
        self._abort_request(self.waiting.popleft(), self._clock)


class SimpleEngine(Engine):
    """Each request on its own: TTFT = base + uncached blocks x per block, then a fixed time per token.

    Requests still share the block pool (hits, eviction); a request waits (FCFS) until its prompt
    blocks can be allocated, and generated tokens are cached while blocks are free.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.running: set[EngineRequest] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._admitted: dict[str, asyncio.Future[float]] = {}

    def add_request(self, req: EngineRequest) -> None:
        req.timings.arrival = self.emu_now()
        self.requests[req.request_id] = req
        self.waiting.append(req)
        loop = asyncio.get_running_loop()
        admitted = self._admitted[req.request_id] = loop.create_future()
        self._tasks[req.request_id] = loop.create_task(self._serve(req, admitted))
        self._admit_waiting(req.timings.arrival)

    def _admit_waiting(self, now: float) -> None:
        """Admit waiting requests (FCFS) whose prompt blocks fit, at emulated time `now`."""
        while self.waiting:
            admitted = self._admit_head()
            if admitted is None:
                break
            req, cached = admitted
            num_new = req.seq.num_tokens - cached
            now = max(now, req.timings.arrival)
            self._record_admission(req, cached, now)
            req.status = RequestStatus.RUNNING
            self.running.add(req)
            fut = self._admitted.pop(req.request_id)
            if not fut.done():
                fut.set_result(now + self.profile.isolated_ttft(cdiv(num_new, self.block_size)))
        self.flush_kv_events()

    async def _serve(self, req: EngineRequest, admitted: asyncio.Future[float]) -> None:
        t = await admitted
        await self.sleep_until(t)
        self._emit_token(req, t)
        if self.metrics is not None:
            self.metrics.on_generated(1)
        mgr = self.kv_cache_manager
        while not req.finished:
            mgr.allocate_slots(req.seq, 1)  # best effort: without a free block the token is not cached
            self.flush_kv_events()
            t += self.profile.decode_per_token
            await self.sleep_until(t)
            self._emit_token(req, t)
            if self.metrics is not None:
                self.metrics.on_generated(1)

    def _finish(self, req: EngineRequest, reason: str, stop_reason: str | int | None, t: float) -> None:
        self.running.discard(req)
        self._tasks.pop(req.request_id, None)
        super()._finish(req, reason, stop_reason, t)
        self.flush_kv_events()
        self._admit_waiting(t)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        task = self._tasks.get(request_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if req in self.waiting:
            self.waiting.remove(req)
        self._admitted.pop(request_id, None)
        self._abort_request(req, self.emu_now())
        return True


def make_engine(config: EmulatorConfig, tokenizer: Tokenizer | None = None, metrics: EngineMetrics | None = None) -> Engine:
    """The engine `config.engine` names ("batched" or "simple")."""
    cls = BatchedEngine if config.engine == "batched" else SimpleEngine
    return cls(config, tokenizer=tokenizer, metrics=metrics)
