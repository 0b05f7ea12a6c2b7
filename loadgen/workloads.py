"""Seeded workloads: the list of requests an experiment sends, fixed by (workload config, seed).

Each workload returns `RequestSpec`s grouped into chains: requests of one chain run one after the
other (a chat session's turns, with think time between them); chains are started by the arrival
process. Prompt text comes from `text.py`, so token counts and shared prefixes are exact.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field, replace
from typing import Any

from kvblocks import render_chat

from .config import WorkloadConfig
from .text import count_tokens, seeded_words, words
from .trace import TracePromptBuilder, read_trace

# Headroom for the chat template's own tokens (role markers) in chat workloads.
CHAT_TEMPLATE_MARGIN = 64


@dataclass
class RequestSpec:
    """One request to send: completions (`prompt`) or chat (`messages`), and where it sits in its chain."""

    index: int
    api: str
    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    chain: int = 0
    turn: int = 0
    think_time: float = 0.0
    arrival: float | None = None
    prompt_tokens: int = 0
    tags: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # the request's own model (an adapter, one of several models); None: the run's

    def rendered_prompt(self) -> str:
        """The text the backend tokenizes (the chat template applied for chat requests)."""
        if self.messages is not None:
            return render_chat(self.messages)
        return self.prompt or ""


@dataclass
class Workload:
    """A named, seeded list of requests plus the parameters and caveats a report should state."""

    name: str
    requests: list[RequestSpec]
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def chains(self) -> list[list[RequestSpec]]:
        """Requests grouped by chain, in chain order; each chain in turn order."""
        by: dict[int, list[RequestSpec]] = {}
        for r in self.requests:
            by.setdefault(r.chain, []).append(r)
        return [sorted(v, key=lambda r: r.turn) for _, v in sorted(by.items())]


def zipf_sampler(n: int, s: float, rng: random.Random):
    """Draw ranks 0..n-1 with P(k) proportional to 1/(k+1)^s."""
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)

    def draw() -> int:
        return min(bisect.bisect_left(cum, rng.random()), n - 1)

    return draw


def _prompt_budget(cfg: WorkloadConfig) -> int:
    """Most prompt tokens a request may carry: max_model_len minus its output."""
    return cfg.max_model_len - cfg.output_tokens


def rag(cfg: WorkloadConfig) -> Workload:
    """K documents of 1-4k tokens, each request = one Zipf-popular document + a fresh question."""
    rng = random.Random(repr((cfg.seed, "rag")))
    budget = _prompt_budget(cfg) - cfg.question_tokens
    sizes = [min(rng.randint(cfg.doc_tokens_min, cfg.doc_tokens_max), budget) for _ in range(cfg.documents)]
    docs = [seeded_words(n, cfg.seed, "rag-doc", i) for i, n in enumerate(sizes)]
    draw = zipf_sampler(cfg.documents, cfg.zipf_s, rng)
    reqs = []
    for i in range(cfg.requests):
        d = draw()
        prompt = docs[d] + words(rng, cfg.question_tokens)
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=sizes[d] + cfg.question_tokens, tags={"doc": d}))
    return Workload("rag", reqs, {
        "documents": cfg.documents, "doc_tokens": f"{cfg.doc_tokens_min}-{cfg.doc_tokens_max}",
        "doc_tokens_total": sum(sizes), "zipf_s": cfg.zipf_s, "question_tokens": cfg.question_tokens,
        "output_tokens": cfg.output_tokens,
    })


def multiturn(cfg: WorkloadConfig) -> Workload:
    """Chat sessions; every turn resends the whole conversation plus a new user message.

    Assistant turns in the history are seeded text of `output_tokens` tokens (not the server's
    reply), so the prompts are identical whichever backend answered.
    """
    per_turn = cfg.turn_tokens + cfg.output_tokens + 16
    max_turns = max(1, (_prompt_budget(cfg) - CHAT_TEMPLATE_MARGIN) // per_turn)
    turns = min(cfg.turns, max_turns)
    sessions = cfg.sessions or -(-cfg.requests // turns)
    reqs: list[RequestSpec] = []
    notes = [] if turns == cfg.turns else [f"turns capped at {turns} to fit max_model_len {cfg.max_model_len}"]
    for s in range(sessions):
        history: list[dict[str, str]] = []
        for t in range(turns):
            if len(reqs) >= cfg.requests:
                break
            history.append({"role": "user", "content": seeded_words(cfg.turn_tokens, cfg.seed, "mt-user", s, t)})
            msgs = [dict(m) for m in history]
            reqs.append(RequestSpec(len(reqs), "chat", cfg.output_tokens, messages=msgs, chain=s, turn=t,
                                    think_time=cfg.think_time if t else 0.0,
                                    prompt_tokens=count_tokens(render_chat(msgs)), tags={"turn": t}))
            history.append({"role": "assistant",
                            "content": seeded_words(cfg.output_tokens, cfg.seed, "mt-assistant", s, t)})
    return Workload("multiturn", reqs, {
        "sessions": sessions, "turns": turns, "turn_tokens": cfg.turn_tokens, "think_time_s": cfg.think_time,
        "output_tokens": cfg.output_tokens,
    }, notes)


def sysprompt(cfg: WorkloadConfig) -> Workload:
    """A few shared system prompts with few-shot examples; every request asks a new question."""
    rng = random.Random(repr((cfg.seed, "sysprompt")))
    shot_tokens = 48
    prefixes = []
    for p in range(cfg.system_prompts):
        msgs = [{"role": "system", "content": seeded_words(cfg.system_tokens, cfg.seed, "sys", p)}]
        for k in range(cfg.few_shot):
            msgs.append({"role": "user", "content": seeded_words(shot_tokens, cfg.seed, "shot-q", p, k)})
            msgs.append({"role": "assistant", "content": seeded_words(shot_tokens, cfg.seed, "shot-a", p, k)})
        prefixes.append(msgs)
    reqs = []
    for i in range(cfg.requests):
        p = rng.randrange(cfg.system_prompts)
        msgs = [dict(m) for m in prefixes[p]] + [{"role": "user", "content": words(rng, cfg.question_tokens)}]
        reqs.append(RequestSpec(i, "chat", cfg.output_tokens, messages=msgs, chain=i,
                                prompt_tokens=count_tokens(render_chat(msgs)), tags={"system_prompt": p}))
    return Workload("sysprompt", reqs, {
        "system_prompts": cfg.system_prompts, "system_tokens": cfg.system_tokens, "few_shot": cfg.few_shot,
        "question_tokens": cfg.question_tokens, "output_tokens": cfg.output_tokens,
    })


def prefix_sweep(cfg: WorkloadConfig) -> Workload:
    """One shared prefix per length in the sweep; requests = prefix + unique question, lengths interleaved."""
    rng = random.Random(repr((cfg.seed, "prefix-sweep")))
    cap = _prompt_budget(cfg) - cfg.question_tokens
    lengths = sorted({min(n, cap) for n in cfg.prefix_lengths})
    notes = []
    if any(n > cap for n in cfg.prefix_lengths):
        notes.append(f"prefix lengths above {cap} tokens capped to {cap} "
                     f"(max_model_len {cfg.max_model_len} - question {cfg.question_tokens} - output {cfg.output_tokens})")
    prefixes = {n: seeded_words(n, cfg.seed, "sweep-prefix", n) for n in lengths}
    order = [lengths[i % len(lengths)] for i in range(cfg.requests)]
    rng.shuffle(order)
    reqs = [RequestSpec(i, "completions", cfg.output_tokens, prompt=prefixes[n] + words(rng, cfg.question_tokens),
                        chain=i, prompt_tokens=n + cfg.question_tokens, tags={"prefix_len": n})
            for i, n in enumerate(order)]
    return Workload("prefix-sweep", reqs, {
        "prefix_lengths": lengths, "question_tokens": cfg.question_tokens, "output_tokens": cfg.output_tokens,
    }, notes)


def tenants(cfg: WorkloadConfig) -> Workload:
    """Many tenants, each a long shared context; the tenant's users take turns asking questions."""
    rng = random.Random(repr((cfg.seed, "tenants")))
    size = min(cfg.tenant_tokens, _prompt_budget(cfg) - cfg.question_tokens - 32)
    contexts = [seeded_words(size, cfg.seed, "tenant", t) for t in range(cfg.tenants)]
    next_user = [0] * cfg.tenants
    reqs = []
    for i in range(cfg.requests):
        t = rng.randrange(cfg.tenants)
        u = next_user[t]
        next_user[t] = (u + 1) % cfg.users_per_tenant
        user_line = seeded_words(8, cfg.seed, "tenant-user", t, u)
        prompt = contexts[t] + user_line + words(rng, cfg.question_tokens)
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=size + 8 + cfg.question_tokens, tags={"tenant": t, "user": u}))
    return Workload("tenants", reqs, {
        "tenants": cfg.tenants, "tenant_tokens": size, "users_per_tenant": cfg.users_per_tenant,
        "question_tokens": cfg.question_tokens, "output_tokens": cfg.output_tokens,
    })


def trace(cfg: WorkloadConfig) -> Workload:
    """Replay a Mooncake trace: its sharing, lengths and arrival times (divided by the speed-up)."""
    records = read_trace(cfg.trace_path, cfg.trace_offset, cfg.requests)
    builder = TracePromptBuilder(cfg.seed)
    reqs, truncated, out_capped = [], 0, 0
    t0 = records[0].timestamp_ms if records else 0.0
    for i, rec in enumerate(records):
        out = max(1, rec.output_length)
        if cfg.trace_max_output and out > cfg.trace_max_output:
            out, out_capped = cfg.trace_max_output, out_capped + 1
        out = min(out, cfg.max_model_len // 2)
        prompt, n = builder.prompt(rec, cfg.max_model_len - out)
        truncated += n < rec.input_length
        reqs.append(RequestSpec(i, "completions", out, prompt=prompt, chain=i,
                                arrival=(rec.timestamp_ms - t0) / 1000.0 / cfg.trace_speedup, prompt_tokens=n,
                                tags={"trace_line": cfg.trace_offset + i, "input_length": rec.input_length}))
    notes = []
    if truncated:
        notes.append(f"{truncated} of {len(reqs)} trace prompts truncated to fit max_model_len "
                     f"{cfg.max_model_len} minus their output length")
    if out_capped:
        notes.append(f"{out_capped} output lengths capped at {cfg.trace_max_output} tokens")
    return Workload("trace", reqs, {
        "trace": cfg.trace_path, "offset": cfg.trace_offset, "speedup": cfg.trace_speedup,
        "records": len(reqs), "trace_span_s": (records[-1].timestamp_ms - t0) / 1000.0 if records else 0.0,
    }, notes)


def burst(cfg: WorkloadConfig) -> Workload:
    """A few short shared prefixes (all of them fit every backend's cache) and a unique suffix per
    request; consecutive groups of `burst_size` requests share a prefix, so under `--rate` each burst
    of arrivals is one prefix (the shape of a public prefix-sharing benchmark: once every backend has
    every prefix, the cache is in effect replicated and what matters is spreading the bursts)."""
    rng = random.Random(repr((cfg.seed, "burst")))
    size = min(cfg.burst_prefix_tokens, _prompt_budget(cfg) - cfg.burst_suffix_tokens)
    prefixes = [seeded_words(size, cfg.seed, "burst-prefix", p) for p in range(cfg.burst_prefixes)]
    group = cfg.burst_size
    reqs = []
    p = 0
    for i in range(cfg.requests):
        if i % group == 0:
            p = rng.randrange(cfg.burst_prefixes)
        prompt = prefixes[p] + words(rng, cfg.burst_suffix_tokens)
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=size + cfg.burst_suffix_tokens, tags={"prefix": p}))
    return Workload("burst", reqs, {
        "prefixes": cfg.burst_prefixes, "prefix_tokens": size, "suffix_tokens": cfg.burst_suffix_tokens,
        "burst": group, "output_tokens": cfg.output_tokens,
    })


def rotating_prefix(cfg: WorkloadConfig) -> Workload:
    """One shared prefix at a time: every request is the current prefix plus a unique suffix, and the
    prefix is replaced by a new one every `rotate_after` requests (under --rate 10 and 30 requests, every
    ~3 s). The shape of a public trace where a light load fits every cache: spreading costs one prefill
    per backend per prefix, concentrating queues requests behind each other."""
    rng = random.Random(repr((cfg.seed, "rotating-prefix")))
    size = min(cfg.rotate_prefix_tokens, _prompt_budget(cfg) - cfg.rotate_suffix_tokens)
    reqs = []
    for i in range(cfg.requests):
        p = i // cfg.rotate_after
        prompt = seeded_words(size, cfg.seed, "rotating-prefix", p) + words(rng, cfg.rotate_suffix_tokens)
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=size + cfg.rotate_suffix_tokens, tags={"prefix": p}))
    return Workload("rotating-prefix", reqs, {
        "prefix_tokens": size, "rotate_after": cfg.rotate_after, "suffix_tokens": cfg.rotate_suffix_tokens,
        "prefixes": -(-cfg.requests // cfg.rotate_after), "output_tokens": cfg.output_tokens,
    })


def b2b_saas(cfg: WorkloadConfig) -> Workload:
    """llm-d's precise prefix-cache benchmark shape ("B2B SaaS", inference-perf `shared_prefix`): C customers,
    each a shared context; U users per customer, each with a fixed question, so the C x U prompts are
    context + question, shuffled once and sent in turn (prompt i % (C x U)), each one coming back every
    C x U requests. Arrivals: Poisson stages (RATE:SECONDS, the workload's own times, as a trace's) unless
    --rate/--concurrency is given; `b2b_stage_scale` shortens every stage (same rates, fewer requests)."""
    rng = random.Random(repr((cfg.seed, "b2b-saas")))
    out = min(cfg.b2b_output_tokens, cfg.max_model_len // 4)
    ctx_n, q_n = cfg.b2b_context_tokens, cfg.b2b_question_tokens
    notes = []
    budget = cfg.max_model_len - out
    if ctx_n + q_n > budget:  # keep the context:question ratio when a small max_model_len must hold them
        scale = budget / (ctx_n + q_n)
        ctx_n, q_n = int(ctx_n * scale), max(1, int(q_n * scale))
        notes.append(f"context {cfg.b2b_context_tokens} and question {cfg.b2b_question_tokens} tokens scaled to "
                     f"{ctx_n} and {q_n} to fit max_model_len {cfg.max_model_len} minus {out} output tokens")
    if out < cfg.b2b_output_tokens:
        notes.append(f"output capped at {out} tokens (max_model_len / 4)")
    prompts = [(c, u) for c in range(cfg.b2b_customers) for u in range(cfg.b2b_users)]
    rng.shuffle(prompts)
    times = staged_poisson(cfg.b2b_stage_list, cfg.b2b_stage_scale, cfg.requests, rng)
    if len(times) < cfg.requests:
        notes.append(f"the stages end after {len(times)} arrivals (fewer than --requests {cfg.requests})")
    contexts: dict[int, str] = {}
    reqs = []
    for i, t in enumerate(times):
        c, u = prompts[i % len(prompts)]
        if c not in contexts:
            contexts[c] = seeded_words(ctx_n, cfg.seed, "b2b-context", c)
        prompt = contexts[c] + seeded_words(q_n, cfg.seed, "b2b-question", c, u)
        reqs.append(RequestSpec(i, "completions", out, prompt=prompt, chain=i, arrival=t,
                                prompt_tokens=ctx_n + q_n, tags={"customer": c, "user": u}))
    demand = cfg.b2b_customers * (ctx_n + cfg.b2b_users * q_n)
    return Workload("b2b-saas", reqs, {
        "customers": cfg.b2b_customers, "context_tokens": ctx_n, "users_per_customer": cfg.b2b_users,
        "question_tokens": q_n, "output_tokens": out, "stages": cfg.b2b_stages, "stage_scale": cfg.b2b_stage_scale,
        "resident_tokens": demand, "span_s": times[-1] if times else 0.0,
    }, notes)


def staged_poisson(stages: list[tuple[float, float]], scale: float, limit: int, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process whose rate steps through (rate, seconds x scale) stages; at most
    `limit` of them, none after the last stage ends."""
    out: list[float] = []
    start = 0.0
    for rate, seconds in stages:
        end = start + seconds * scale
        t = start + rng.expovariate(rate)
        while t < end and len(out) < limit:
            out.append(t)
            t += rng.expovariate(rate)
        start = end
    return out


def mixed(cfg: WorkloadConfig) -> Workload:
    """RAG questions, chat sessions and unique prompts at once, interleaved in a seeded order (a chat
    session is one chain: its turns follow each other with think time)."""
    rng = random.Random(repr((cfg.seed, "mixed")))
    n_rag = round(cfg.requests * cfg.mixed_rag)
    n_chat = round(cfg.requests * cfg.mixed_chat)
    n_unique = cfg.requests - n_rag - n_chat
    parts: list[list[RequestSpec]] = []
    if n_rag:
        parts += [[r] for r in rag(replace(cfg, name="rag", requests=n_rag)).requests]
    if n_chat:
        parts += multiturn(replace(cfg, name="multiturn", requests=n_chat)).chains()
    for i in range(n_unique):
        n = rng.randint(cfg.doc_tokens_min // 2, cfg.doc_tokens_max // 2)
        prompt = words(rng, n)
        parts.append([RequestSpec(0, "completions", cfg.output_tokens, prompt=prompt, prompt_tokens=count_tokens(prompt))])
    for chain in parts:
        kind = "chat" if chain[0].api == "chat" else ("rag" if "doc" in chain[0].tags else "unique")
        for r in chain:
            r.tags["kind"] = kind
    rng.shuffle(parts)
    reqs = []
    for c, chain in enumerate(parts):
        for r in chain:
            r.index, r.chain = len(reqs), c
            reqs.append(r)
    return Workload("mixed", reqs, {
        "rag_requests": n_rag, "chat_requests": n_chat, "unique_requests": n_unique, "documents": cfg.documents,
        "turns": cfg.turns, "output_tokens": cfg.output_tokens,
    }, ["arrivals (--rate) start chains: a chat session is one arrival, its turns follow with think time"])


def lora(cfg: WorkloadConfig) -> Workload:
    """K LoRA adapters (`<lora_prefix><k>`) with Zipf popularity over one base model: every prompt is a
    shared base preamble, the adapter's own system prompt, then a new question. The preamble is the same
    text for every adapter, but each adapter's KV blocks are its own (vLLM keys them by adapter)."""
    rng = random.Random(repr((cfg.seed, "lora")))
    preamble = seeded_words(cfg.base_tokens, cfg.seed, "lora-base")
    systems = [seeded_words(cfg.system_tokens, cfg.seed, "lora-sys", k) for k in range(cfg.adapters)]
    draw = zipf_sampler(cfg.adapters, cfg.zipf_s, rng)
    reqs = []
    for i in range(cfg.requests):
        k = draw()
        prompt = f"{preamble}\n{systems[k]}\n{words(rng, cfg.question_tokens)}"
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=count_tokens(prompt), tags={"adapter": k},
                                model=f"{cfg.lora_prefix}{k}"))
    return Workload("lora", reqs, {
        "adapters": cfg.adapters, "lora_prefix": cfg.lora_prefix, "zipf_s": cfg.zipf_s, "base_tokens": cfg.base_tokens,
        "system_tokens": cfg.system_tokens, "question_tokens": cfg.question_tokens, "output_tokens": cfg.output_tokens,
    }, notes=[f"the backends must serve adapters {cfg.lora_prefix}0..{cfg.lora_prefix}{cfg.adapters - 1}"])


def multimodel(cfg: WorkloadConfig) -> Workload:
    """Several base models (`models`) with Zipf popularity, each with its own shared system prompts
    (`system_prompts` per model); every request asks a new question."""
    if not cfg.models:
        raise ValueError("the multimodel workload needs models (--models A,B)")
    rng = random.Random(repr((cfg.seed, "multimodel")))
    systems = {m: [seeded_words(cfg.system_tokens, cfg.seed, "mm-sys", m, p) for p in range(cfg.system_prompts)]
               for m in cfg.models}
    draw = zipf_sampler(len(cfg.models), cfg.zipf_s, rng)
    reqs = []
    for i in range(cfg.requests):
        m = cfg.models[draw()]
        p = rng.randrange(cfg.system_prompts)
        prompt = f"{systems[m][p]}\n{words(rng, cfg.question_tokens)}"
        reqs.append(RequestSpec(i, "completions", cfg.output_tokens, prompt=prompt, chain=i,
                                prompt_tokens=count_tokens(prompt), tags={"model": m, "system_prompt": p}, model=m))
    return Workload("multimodel", reqs, {
        "models": list(cfg.models), "zipf_s": cfg.zipf_s, "system_prompts": cfg.system_prompts,
        "system_tokens": cfg.system_tokens, "question_tokens": cfg.question_tokens, "output_tokens": cfg.output_tokens,
    })


WORKLOADS = {
    "rag": rag,
    "multiturn": multiturn,
    "sysprompt": sysprompt,
    "prefix-sweep": prefix_sweep,
    "tenants": tenants,
    "trace": trace,
    "burst": burst,
    "mixed": mixed,
    "rotating-prefix": rotating_prefix,
    "lora": lora,
    "multimodel": multimodel,
    "b2b-saas": b2b_saas,
}


def build_workload(cfg: WorkloadConfig) -> Workload:
    """The requests of `cfg.name`, reproducible from the config and seed."""
    return WORKLOADS[cfg.name](cfg)
