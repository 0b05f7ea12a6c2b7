"""Routing as a plain class: request -> block hashes -> policy decision -> in-flight bookkeeping.

Owns the prefix index, the backend registry and one instance of each policy; the HTTP layer calls
`context`, `decide`, `begin`, `first_byte` and `end`, and tests can drive it without HTTP.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Protocol

from kvblocks import BUILTIN_TOKENIZER, HASH_ALGOS, APIError, BlockHasher, ExtraKeys, extra_keys, get_tokenizer
from kvblocks.latency import get_profile

from ..backends.circuit_breaker import BreakerState, CircuitBreaker
from ..backends.registry import Backend, BackendRegistry, InFlight, now
from ..index.kv_events import KVEventsFollower, KVEventSource
from ..index.exact_audit import ExactViewAudit
from ..index.prefix_index import PrefixIndex
from .policies import Decision, Policy, RequestContext, RoutingEnv, create_policies, policy_names
from .prompt_walk import PromptState, PromptWalker
from .adapters import AdapterCatalog
from .session import SessionAffinity
from .settings import BACKEND_TOKENIZER, RoutingSettings
from .tokenize_cache import ChunkedTokenizer
# Margin on the estimated prefill time before a non-streaming request stops counting as queued prefill.
FIRST_TOKEN_MARGIN = 1.5


log = logging.getLogger("kvroute.proxy")


class ReplicaHooks(Protocol):
    """What the router tells its peer replicas (`proxy.replicas.ReplicaSync`); each call only queues a fact."""

    def begun(self, rec: InFlight, ctx: RequestContext, matched: int, strategy: str) -> None: ...

    def first_byte(self, rec: InFlight) -> None: ...

    def ended(self, rec: InFlight) -> None: ...


class UnknownStrategy(APIError):
    """400: a strategy name no policy has (the message lists the known ones)."""

    def __init__(self, name: object) -> None:
        super().__init__(400, f"unknown strategy {name!r}; choose one of {', '.join(policy_names())}", "strategy")


class Router:
    """The proxy's routing state; one per proxy."""

    def __init__(self, settings: RoutingSettings, registry: BackendRegistry | None = None) -> None:
        """`registry`: the backends' state (the app's, with its circuit-breaker settings); default: a new
        one with default breakers."""
        self.settings = s = settings
        # With `--tokenizer backend` the backends tokenize; the built-in one serves only local estimates.
        self.tokenizer = get_tokenizer(BUILTIN_TOKENIZER if s.tokenizer == BACKEND_TOKENIZER else s.tokenizer)
        self.chunked = ChunkedTokenizer(self.tokenizer)
        self._hashing_split: set[tuple[int, str]] = set()
        # Per model (adapters included), the hashing its backends report when it differs from the
        # fleet's (`hasher`): several models with their own block sizes behind one proxy.
        self._model_hashers: dict[str, BlockHasher] = {}
        self._model_split_logged: set[str] = set()
        self.registry = registry if registry is not None else BackendRegistry(CircuitBreaker)
        self.index = PrefixIndex(s.default_capacity_blocks)
        self.adapters = AdapterCatalog()
        self.sessions = SessionAffinity()
        # The block hasher lives in the walker; the configured one until the backends report theirs.
        self.walker = PromptWalker(self.chunked, self.index, BlockHasher(s.block_size, s.hash_algo))
        self.kv_events = KVEventsFollower(self.index, s.kv_events_silence_timeout)
        self.exact_audit = ExactViewAudit(self.kv_events)
        self.env = RoutingEnv(self.index, get_profile(s.profile), s.block_size, s.time_scale)
        self.policies: dict[str, Policy] = create_policies(self.env, list(s.policy_param))
        self.strategy = self.policy(s.strategy).name
        self.replicas: ReplicaHooks | None = None  # set when replicas share what they route (proxy/replicas/)

    @property
    def hasher(self) -> BlockHasher:
        """How prompts are cut into blocks and hashed now (the walker's)."""
        return self.walker.hasher

    @hasher.setter
    def hasher(self, hasher: BlockHasher) -> None:
        self.walker.set_hasher(hasher)

    # -- configuration --------------------------------------------------------------------------
    def policy(self, name: object) -> Policy:
        """The policy instance registered as `name`, or UnknownStrategy."""
        p = self.policies.get(name) if isinstance(name, str) else None
        if p is None:
            raise UnknownStrategy(name)
        return p

    def set_strategy(self, name: object) -> str:
        """Make `name` the default strategy (UnknownStrategy if none); returns it."""
        self.strategy = self.policy(name).name
        return self.strategy

    def add_backend(
        self, url: str, kv_events: KVEventSource | None = None, api_key: str | None = None
    ) -> tuple[Backend, bool]:
        """Add a backend; with `kv_events` its part of the index follows its KV events (exact while in sync);
        `api_key` is sent upstream with every request to it."""
        b, created = self.registry.add(url)
        if api_key is not None:
            b.api_key = api_key
        if created:
            self.index.add_backend(url)
            if kv_events is not None:
                self.kv_events.follow(url, kv_events, busy=lambda: bool(b.requests))
        return b, created

    def remove_backend(self, url: str) -> Backend | None:
        """Drop `url` from the registry, the index, its KV-event follower and every policy's state;
        None if it was not there. Requests in flight to it finish on their own."""
        b = self.registry.remove(url)
        if b is not None:
            self.kv_events.unfollow(url)
            self.exact_audit.forget(url)
            self.index.remove_backend(url)
            for p in self.policies.values():
                p.forget_backend(url)
            self.sessions.forget_backend(url)
        return b

    def hasher_for(self, model: str | None) -> BlockHasher:
        """How `model`'s prompts are cut into blocks and hashed: as its backends do when they agree on
        it and differ from the fleet (`follow_block_hashing`), else the fleet's hasher."""
        if model is not None and self._model_hashers:
            return self._model_hashers.get(model, self.walker.hasher)
        return self.walker.hasher

    def follow_block_hashing(self) -> bool:
        """Hash blocks as the backends do (from their `vllm:cache_config_info`): the fleet's hashing is
        the block size and hash algorithm all reporting backends agree on; a model (or adapter) whose
        own backends agree on another hashing gets its own hasher, so models served with different
        block sizes are all predicted. A split no hashing can match (a model's backends disagreeing) is
        logged once. Beliefs built on the old hashes are dropped; event-fed (exact) parts stay, since
        they carry the backends' own hashes. Returns whether any hashing changed."""
        fleet = self._follow_fleet_hashing()
        return self._follow_model_hashing() or fleet

    def _follow_fleet_hashing(self) -> bool:
        cur = (self.hasher.block_size, self.hasher.algo)
        reported = {
            (b.scraped.block_size or cur[0], b.scraped.hash_algo or cur[1])
            for b in self.registry
            if b.scraped.block_size or b.scraped.hash_algo
        }
        if len(reported) != 1:
            if len(reported) > 1 and reported != self._hashing_split:
                log.info("backends differ in block hashing %s: %d-token blocks, %s unless a model's backends agree "
                         "on their own", sorted(reported), *cur)
            self._hashing_split = reported
            return False
        ((bs, algo),) = reported
        if (bs, algo) == cur or algo not in HASH_ALGOS or bs < 1:
            return False
        log.info("following the backends' block hashing: %d-token blocks, %s (was %d, %s)", bs, algo, *cur)
        self.hasher = BlockHasher(bs, algo)  # voids the walker's cached prefix hashes
        self.env.block_size = bs
        for url in self.index.backends():
            if not self.kv_events.is_exact(url):
                self.index.clear(url)
        return True

    def _follow_model_hashing(self) -> bool:
        default = (self.hasher.block_size, self.hasher.algo)
        per_model: dict[str, set[tuple[int, str]]] = {}
        for b in self.registry:
            s = b.scraped
            if b.models and (s.block_size or s.hash_algo):
                setting = (s.block_size or default[0], s.hash_algo or default[1])
                for m in b.models:
                    per_model.setdefault(m, set()).add(setting)
        new: dict[str, BlockHasher] = {}
        for m, settings in per_model.items():
            if len(settings) > 1:
                if m not in self._model_split_logged:
                    self._model_split_logged.add(m)
                    log.warning("the backends of model %r disagree on block hashing %s; its prefixes are hashed "
                                "as %d-token blocks, %s and will not match all of them", m, sorted(settings), *default)
                continue
            ((bs, algo),) = settings
            if (bs, algo) != default and algo in HASH_ALGOS and bs >= 1:
                old = self._model_hashers.get(m)
                new[m] = old if old is not None and (old.block_size, old.algo) == (bs, algo) else BlockHasher(bs, algo)
        if new == self._model_hashers:
            return False
        changed = {m for m in new.keys() | self._model_hashers.keys() if new.get(m) != self._model_hashers.get(m)}
        for m in sorted(changed):
            h = new.get(m)
            log.info("model %r: %d-token blocks, %s (its backends' hashing)", m,
                     *((h.block_size, h.algo) if h is not None else default))
        self._model_hashers = new
        for b in self.registry:  # what was believed of these backends was hashed the old way
            if b.models and changed.intersection(b.models) and b.url in self.index.backends() \
                    and not self.kv_events.is_exact(b.url):
                self.index.clear(b.url)
        return True

    def reset(self) -> None:
        """Forget every cached-prefix belief (the backends' caches are reset by the caller)."""
        self.index.clear()
        self.kv_events.forget_all()
        self.sessions.reset()
        for p in self.policies.values():
            p.reset()

    # -- per request ----------------------------------------------------------------------------
    def extra_keys(self, model: str | None, cache_salt: str | None = None) -> ExtraKeys | None:
        """The hash keys a backend adds to this request's blocks: its LoRA adapter (when `model` names
        one a backend serves) on every block, `cache_salt` on block 0."""
        return extra_keys(self.adapters.lora_key(model, self.registry), cache_salt)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt; long shared prefixes (documents, chat history) are encoded once."""
        return self.chunked.encode(text)

    def text_context(
        self, text: str, max_tokens: int | None = None, model: str | None = None, cache_salt: str | None = None,
        lazy: bool = True, strategy: str | None = None,
    ) -> RequestContext:
        """The routing view of a prompt given as text. Lazy (the default): tokenized and hashed only as
        far as any backend can match it (`prompt_walk.py`); `complete(ctx)` finishes the job.

        Blind when `strategy` names a policy that does not read the prompt: nothing is tokenized (the
        count is estimated; `complete(ctx)` still tokenizes on demand, e.g. for the length check)."""
        keys = self.extra_keys(model, cache_salt)
        hasher = self.hasher_for(model)
        st = PromptState(text, keys, hasher)
        if lazy and text and not self.policies[strategy or self.strategy].reads_prompt:
            return RequestContext(
                st.hashes, st.estimated_tokens(),
                max_tokens if max_tokens is not None else self.settings.default_max_tokens,
                model, self.index, {}, tail=st, completer=self.complete, blind=True,
                lora=keys.lora.name if keys is not None and keys.lora is not None else None,
                block_size=hasher.block_size,
            )
        matches = None
        if lazy:
            matches = self.walker.walk(st)
        else:
            self.walker.finish(st)
        return RequestContext(
            st.hashes, st.estimated_tokens(), max_tokens if max_tokens is not None else self.settings.default_max_tokens,
            model, self.index, matches, tail=None if st.done else st, completer=self.complete,
            lora=keys.lora.name if keys is not None and keys.lora is not None else None,
            block_size=hasher.block_size,
        )

    def complete(self, ctx: RequestContext, stop_at: int | None = None) -> None:
        """Tokenize and hash the rest of a lazy context (policies and checks that need the whole prompt).

        With `stop_at`, stop once that many tokens are known: the prompt is then too long anyway,
        `ctx.num_tokens` is a lower bound and the context stays incomplete (cost bounded by the limit)."""
        st = ctx.tail
        if st is None:
            return
        self.walker.finish(st, stop_at)  # extends st.hashes, the list ctx.hashes already is
        ctx.num_tokens = len(st.ids)
        if st.done:
            ctx.tail = None

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None, model: str | None = None) -> list[int]:
        """Int-form chained block hashes, as the backend computes them (cache_salt salts block 0, an
        adapter named by `model` keys every block)."""
        keys = self.extra_keys(model, cache_salt)
        from_bytes = int.from_bytes
        return [from_bytes(d[-8:], "big") for d in self.hasher_for(model).hashes(token_ids, keys=keys)]

    def context(
        self, token_ids: Sequence[int], max_tokens: int | None = None, model: str | None = None, cache_salt: str | None = None
    ) -> RequestContext:
        """The routing view of a prompt given as token ids: hashed in full (complete at once)."""
        return RequestContext(
            self.hashes(token_ids, cache_salt, model),
            len(token_ids),
            max_tokens if max_tokens is not None else self.settings.default_max_tokens,
            model,
            self.index,
            lora=model if self.adapters.lora_key(model, self.registry) is not None else None,
            block_size=self.hasher_for(model).block_size,
        )

    def candidates(self, model: str | None = None, exclude: Collection[Backend] = ()) -> list[Backend]:
        """Healthy backends serving `model` whose circuit breaker lets a request through."""
        healthy = self.registry.healthy()
        closed = BreakerState.CLOSED
        if model is None and not exclude and all(b.breaker.state is closed for b in healthy):
            return healthy
        out = [b for b in healthy if b not in exclude and b.serves(model) and b.breaker.allows()]
        if self.settings.lora_runtime_load:
            card = self.adapters.card(model, self.registry)
            if card is not None:  # backends of its base model that may load it at run time
                out += [b for b in healthy if b not in exclude and b not in out and b.runtime_lora is not False
                        and b.models is not None and card.parent in b.models and b.breaker.allows()]
        return out

    def decide(self, ctx: RequestContext, strategy: str | None = None, exclude: Collection[Backend] = ()) -> Decision:
        """The backend `strategy` (default: the current one) picks among `candidates(ctx.model, exclude)`.

        APIError 502 when `exclude` (backends already tried) leaves none, 503 when none is healthy or
        all are out of rotation. Records nothing: `begin` does, once the request is sent."""
        policy = self.policies[strategy or self.strategy]
        cands = self.candidates(ctx.model, exclude)
        if not cands:
            if exclude and self.candidates(ctx.model):
                raise APIError(502, "the backend failed and no other healthy backend is left")
            serving = [b for b in self.registry.healthy() if b.serves(ctx.model)]
            if serving:
                raise APIError(503, "every backend is temporarily out of rotation after repeated failures; retry later")
            raise APIError(503, "no healthy backend available" + (f" for model {ctx.model!r}" if ctx.model else ""))
        if ctx.session is not None:
            ctx.session_home = self.sessions.home(ctx.session, cands)
        return policy.pick(ctx, cands)

    def model_label(self, model: str | None) -> str:
        """`model` as a metric label: only names some backend serves (a client cannot grow the label set)."""
        if model is None:
            return ""
        for b in self.registry:
            if b.models and model in b.models:
                return model
        return ""

    def max_model_len(self, model: str | None) -> int:
        """The longest context a backend serving `model` accepts (from its /v1/models), else the configured default."""
        known = [b.max_model_len for b in self.registry if b.max_model_len and b.serves(model)]
        return max(known) if known else self.settings.max_model_len

    def begin(self, ctx: RequestContext, decision: Decision, strategy: str | None = None, stream: bool = False) -> InFlight:
        """Count the request as the backend's load from now on and assume it will cache the prompt.

        A streamed request counts as queued prefill until its first chunk arrives: that chunk is the
        first token. A non-streamed one sends nothing until it ends, so it leaves the queue at its
        estimated first token (with a margin) instead."""
        b = decision.backend
        prof = self.env.profile
        t = now()
        bs = ctx.block_size or self.env.block_size
        uncached = max(0.0, ctx.num_tokens / bs - decision.matched_blocks)
        prefill_s = prof.prefill_base + uncached * prof.prefill_per_block
        pending_s, _ = b.pending_prefill(t) if b.requests else (0.0, 0)
        expected = float("inf") if stream else t + FIRST_TOKEN_MARGIN * (pending_s + prefill_s) * self.env.time_scale
        rec = InFlight(
            self.registry.new_request_id(), b, ctx.num_tokens / bs, uncached, ctx.max_tokens,
            prefill_s, expected, t,
            decode_wall=max(0.0, ctx.max_tokens * prof.decode_per_token * self.env.time_scale),
            # Blocks it adds to what is pinned: cached prefix blocks are shared with whoever else uses
            # them (five requests on one document pin it once), so only its own prompt and output count.
            held_blocks=uncached + ctx.max_tokens / bs,
            lora=ctx.lora,
        )
        b.add(rec)
        b.processed += 1
        if ctx.blind:  # the policy did not read the prompt: nothing to record in the index
            pass
        elif self.kv_events.is_exact(b.url):  # an in-sync event-fed backend reports its cache itself
            tail = ctx.tail
            self.kv_events.routed(rec.id, b.url, ctx.hashes, tail, self.walker.tail_blocks(tail) if tail is not None else 0)
        elif ctx.tail is not None:
            self.index.record_routed(b.url, ctx.hashes, ctx.tail, self.walker.tail_blocks(ctx.tail))
        else:
            self.index.record_routed(b.url, ctx.hashes)
        if ctx.tail is None and ctx.hashes and not ctx.blind:
            self.index.mark_prompt_end(ctx.hashes[-1])
        self.policies[strategy or self.strategy].observe(ctx, b)
        if self.replicas is not None:
            self.replicas.begun(rec, ctx, decision.matched_blocks, strategy or self.strategy)
        if ctx.session is not None:
            self.sessions.record(ctx.session, b.url)
        return rec

    def first_byte(self, rec: InFlight) -> None:
        """The backend's first byte for `rec` arrived: its prefill is done (idempotent)."""
        if rec.first_byte_at is None:
            rec.backend.started(rec, now())
            if self.replicas is not None:
                self.replicas.first_byte(rec)

    def end(self, rec: InFlight) -> None:
        """`rec` finished (or failed): its load leaves the backend's running totals. Call exactly once per `begin`."""
        rec.backend.remove(rec)
        self.kv_events.finished(rec.id)
        if self.replicas is not None:
            self.replicas.ended(rec)
