"""The default: load-aware prefix routing, a cost in emulated seconds per backend (after Dynamo).

    P(b)    = (prompt blocks - blocks b holds) x prefill_per_block      # prefill b would have to do
    cost(b) = overlap_weight x P(b)                                    # 2: this request's TTFT, and again the
                                                                       #    requests that come to b while it runs
            - overlap_weight x (1 - keep) x prefill(hot prefix blocks b lacks)   # a copy of a hot shared
                                                                       #    prefix, where b has room (or only
                                                                       #    colder blocks to evict): keep =
                                                                       #    1 / (1 + amortize x uses to come /
                                                                       #    (holders + 1)) when the caches can
                                                                       #    afford it, else 1/2
            + [b has pending prefills] x prefill_base                  # the queue it waits behind: vLLM (and the
              + pending uncached blocks x prefill_per_block            #   emulator) prefill all waiting prompts
              + decode_step(decoding requests on b)                    #   in one step, so the base is paid once
            + in_flight(b) x P(b)                                      # its prefill stalls everyone running on b
            + interference_weight x batch_coef x decode_per_token x decode tokens left on b  # decode slowdown
            + decode_weight x batch_coef x decode_per_token x max_tokens x decoding(b)       # ...and its own
            + unseen waiting requests x mean prefill                   # load other clients put on b: scraped
                                                                       #   waiting minus OUR requests that were
                                                                       #   waiting while the scrape was out
            + [short > 0] x (memory_weight x short x prefill_per_block + time to b's next request end)
                  short = pinned blocks + blocks it needs - capacity   # KV memory running requests pin (ours,
                                                                       #   or scraped kv_cache_usage_perc)
            + eviction_weight x prefill(blocks b must evict)           # cache it would destroy there

Load terms read per-backend running totals, so a decision costs the same with thousands of
requests in flight. Then the TTFT band: only backends whose predicted TTFT is within
max(ttft_slack_s, ttft_slack_rel x fastest) of the fastest (over backends holding the prefix or able
to afford a copy) are weighed by cost. Costs within `tie_blocks` blocks of weighted prefill among
backends holding at most `tie_blocks` fewer of the prompt's blocks than the cheapest, or within
`tie_s` among backends holding as many, tie (a tie never gives more cached blocks away than it
calls a tie): least recently
routed-to wins, then fewest indexed blocks, then rendezvous hashing. A chat's next turn (its prompt
continues a routed prompt through that one's end, >= `home_share` cached there) stays home unless
home costs `move_valve_s` more.

Tunables (class attributes; `--policy-param kv_aware.NAME=VALUE`):

| name | default | what it weighs |
|---|---|---|
| overlap_weight | 2.0 | prefill of the blocks b lacks (this request, and those arriving while it runs) |
| stall_weight | 1.0 | that prefill stalling each request in flight on b |
| interference_weight | 0.25 | the decode slowdown it causes b's running requests |
| decode_weight | 0.5 | its own decode slowed by the requests decoding beside it |
| memory_weight | 2.0 | blocks short of KV memory (waits, or preempts and recomputes) |
| eviction_weight | 0.25 | cached blocks it would evict on b |
| replicate_weight, amortize | 1.0, 2.0 | waiving a copy's second prefill; uses to come sharing a copy |
| hot_after, uses_prior | 0, 1 | matches before a prefix may be copied; uses a prefix seen once expects |
| replicate_share | 0.25 | cache share hot copies may fill |
| hot_horizon_s, hot_silence_gaps, hot_min_life_s | 60 s, 8, 5 s | how long a prefix stays hot (hot_prefixes.py) |
| ttft_band, ttft_slack_s, ttft_slack_rel | 1 (on), 0.02 s, 0.25 | the TTFT band |
| tie_blocks, tie_s, tie_rotate | 1 block, 0.03 s, 1 (on) | what counts as a tie; rotate ties |
| home_share, shared_after, move_valve_s | 0.3, 2, 0.5 s | when a chat turn stays home; when a prefix is shared |
| lora_load_s, lora_swap_s, lora_slot_weight | 0.5 s, 1 s, 1.0 | loading an adapter (--lora-runtime-load); waiting for a slot |

Why each term exists, with the measurements and issues behind it: docs/policies/kv_aware.md.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ...backends.registry import Backend, now
from .base import Decision, Policy, RequestContext
from .hot_prefixes import HotPrefixes
from .rendezvous import request_key, weight

SCRAPE_FRESH_S = 5.0
REUSE_ENTRIES = 65536


class KvAwarePolicy(Policy):
    """The cost policy above; one per router, state: reuse counts, hot prefixes, the rotation."""

    name = "kv_aware"
    overlap_weight = 2.0
    # The decode slowdown mostly costs TPOT, not TTFT (docs/policies/kv_aware.md).
    interference_weight = 0.25
    stall_weight = 1.0
    eviction_weight = 0.25
    # KV memory pinned by running requests (ours in flight, or the scraped vllm:kv_cache_usage_perc
    # when higher): a request needing more blocks than are left waits until the soonest running
    # request ends, or preempts one that must recompute; the blocks short are charged as prefill,
    # twice (the waiting request and the preempted one), on top of that wait.
    memory_weight = 2.0
    tie_blocks = 1.0
    # This request's own decode slows by batch_coef x decode_per_token per token for every request
    # decoding beside it: concentration costs TPOT and E2E, not only TTFT.
    decode_weight = 0.5
    # Copies of hot prefixes (0 = never waive a copy's second prefill charge); `amortize` scales the
    # past uses that share a copy's prefill (0 = the old rule: charged once instead of twice);
    # `replicate_share` of every cache is what hot prefixes may fill with copies; a prefix counts as
    # hot until it has been silent for `hot_silence_gaps` of its usual gaps between uses, and never
    # longer than `hot_horizon_s` emulated seconds after its last use (hot_prefixes.py).
    replicate_weight = 1.0
    amortize = 2.0
    replicate_share = 0.25
    hot_horizon_s = 60.0
    hot_silence_gaps = 8.0
    hot_min_life_s = 5.0
    # A prefix matched by `hot_after` earlier requests may be copied; `uses_prior` is added to its
    # past uses when amortising (a prefix matched once is likely matched again).
    hot_after = 0
    uses_prior = 1.0
    # TTFT band (0 = off): backends beyond max(ttft_slack_s, ttft_slack_rel x fastest) of the
    # fastest predicted TTFT are not weighed.
    ttft_band = 1.0
    ttft_slack_s = 0.02
    ttft_slack_rel = 0.25
    # Costs within tie_s seconds are ties among backends holding as much of the prompt as the
    # cheapest; tie_rotate gives ties to the least recently routed-to backend.
    tie_s = 0.03
    tie_rotate = 1.0

    # A chat turn (its prompt continues a routed prompt exactly through that one's end, and at least
    # this share of it is cached at home) stays home unless home costs move_valve_s more; a prefix
    # that `shared_after` requests matched is a shared document, which may spread.
    home_share = 0.3
    shared_after = 2
    move_valve_s = 0.5
    # A request with a session key (routing/session.py) goes to the session's home unless home costs
    # session_valve_s more than the cheapest backend.
    session_valve_s = 0.5
    # --lora-runtime-load: a backend without the request's adapter must load it first: lora_load_s, and
    # lora_swap_s more when vllm:lora_requests_info shows no free adapter slot (it waits for one).
    lora_load_s = 0.5
    lora_swap_s = 1.0
    # A backend whose --max-loras slots (vllm:lora_requests_info) other adapters' in-flight requests
    # hold (ours and peer replicas'), whether it serves the adapter or would load it: the request waits
    # until one adapter's last request ends (Backend.lora_slot_wait), charged lora_slot_weight x. The scrape's adapter list is
    # not used: it still names adapters whose requests ended since, and would charge a wait for them.
    lora_slot_weight = 1.0

    def __init__(self, env) -> None:
        super().__init__(env)
        self._reuse: OrderedDict[int, int] = OrderedDict()  # deepest matched block -> requests that matched it
        self._hot = HotPrefixes(self.hot_horizon_s, self.hot_silence_gaps, REUSE_ENTRIES, self.hot_min_life_s)
        self._last_pick: dict[str, int] = {}
        self._picks = 0
        # A typical unseen request's prefill: 1024 uncached tokens, as SMG's least_load assumes. A
        # constant, not learnt from this replica's traffic, so replicas weigh scraped load alike.
        self._mean_prefill = env.profile.prefill_base + 64 * env.profile.prefill_per_block

    def costs(self, ctx: RequestContext, candidates: Sequence[Backend]) -> list[float]:
        """The formula above for each of `candidates`, in emulated seconds, same order.

        Also leaves each backend's predicted TTFT and whether it holds (or may take a copy of) the
        prefix in `self._ttft` / `self._fits`, for the band `pick` applies next. Reads the index,
        the backends' running totals and scrapes; changes nothing. O(candidates), whatever is in flight."""
        env = self.env
        prof = env.profile
        ppb = prof.prefill_per_block
        dpt = prof.decode_per_token
        interference = self.interference_weight * prof.batch_coef * dpt
        bs = ctx.block_size or env.block_size
        index = env.index
        t = now()
        n_tok = ctx.num_tokens
        prompt_blocks = n_tok / bs
        full_blocks = ctx.num_blocks(bs)
        max_hit = max(0, (n_tok - 1) // bs)
        out_blocks = ctx.max_tokens / bs
        matches = ctx.matches
        own_decode = self.decode_weight * prof.batch_coef * dpt * ctx.max_tokens
        # A hot shared prefix (matched by `shared_after` requests) is worth copying to a backend with
        # room for it: the copy is paid once and serves later requests there, so its prefill is not
        # charged `overlap_weight` times.
        deepest = max(matches.values()) if matches else 0
        if deepest > max_hit:
            deepest = max_hit
        uses = self._reuse.get(ctx.hashes[deepest - 1], 0) if deepest >= 2 else 0
        hot = deepest >= 2 and self.replicate_weight > 0 and uses >= self.hot_after
        holders = sum(1 for b in candidates if matches.get(b.url, 0) >= deepest) if hot else 0
        affordable = False
        if hot and self.amortize > 0:
            # Copies the caches can afford: every backend keeps `replicate_share` of its blocks for
            # hot prefixes; when all of them fit everywhere (short shared prompts) each may be on every
            # backend, as round robin leaves them; when they do not (RAG), they are partitioned and a
            # copy is made only when a queue pays for it.
            cap = sum(index.capacity(b.url) for b in candidates)
            affordable = holders < self.replicate_share * cap / max(1.0, self.hot_footprint())
        if hot and not affordable and uses < self.shared_after:
            hot = False  # where copies cannot be afforded, only a shared document's earns the old discount
        if affordable:
            # The copy's prefill is paid once and shared by the requests it will serve there: past
            # uses per copy stand in for future ones.
            # uses to come: as many as it had (plus a prior), or what this workload's prefixes
            # typically had left when they died, whichever is more (hot_prefixes.py)
            future = max(uses + self.uses_prior, self._hot.typical_uses - uses)
            keep = 1.0 / (1.0 + self.amortize * future / (holders + 1))
            # Blocks untouched for longer than this prefix stays live are worth less than its copy:
            # a copy that evicts only those is not charged for the eviction.
            # (a prefix seen once has one gap: since its last use on a holder)
            h_deep = ctx.hashes[deepest - 1]
            last = max((index.touched(b.url, h_deep) or 0.0 for b in candidates if matches.get(b.url, 0) >= deepest),
                       default=0.0)
            cold_before = t - self._hot_prefixes().life(h_deep, env.time_scale, t - last if last else None)
        else:
            keep = 1.0 - 1.0 / self.overlap_weight  # the old rule: the prefill once, not twice
        out = []
        ttfts = self._ttft = []
        fits = self._fits = []
        base = prof.prefill_base
        for b in candidates:
            m = matches.get(b.url, 0)
            if m > max_hit:
                m = max_hit
            held = index.num_blocks(b.url)  # read once each: nothing below changes the index
            cap = index.capacity(b.url)
            own = (prompt_blocks - m) * ppb
            cost = self.overlap_weight * own
            saved = 0.0
            # Room for the copy: free blocks, or blocks colder than this prefix's life (LRU order).
            cold = False
            if affordable and m < deepest and held + (full_blocks - m) > cap:
                oldest = index.coldest_touch(b.url)
                cold = oldest is not None and oldest < cold_before
            if hot and m < deepest and (held + (full_blocks - m) <= cap or cold):
                saved = self.replicate_weight * (1.0 - keep) * (deepest - m) * ppb
                cost -= self.overlap_weight * saved
            if b.requests:
                pending_s, n_pending, tokens_left = b.queue_state(t, dpt, env.time_scale)
                if n_pending > 1:  # one step prefills every waiting prompt: its base is paid once
                    pending_s -= (n_pending - 1) * prof.prefill_base
                in_flight = len(b.requests)
                step = prof.decode_step(in_flight - n_pending)
                cost += pending_s + step + self.stall_weight * in_flight * own + interference * tokens_left
                cost += own_decode * (in_flight - n_pending)  # its own decode in a bigger batch
                # A prompt already sent there is most likely in a step that has begun (an engine
                # starts one at once): this one waits for it, then runs in its own.
                ttft = own + step + base + (pending_s + (n_pending - 1) * base if n_pending else 0.0)
            else:
                ttft = own + base
            if affordable:  # a copy's prefill, shared by the requests it will serve
                ttft -= saved
            s = b.scraped
            fresh = t - s.at < SCRAPE_FRESH_S
            if fresh and (s.waiting or s.running):  # requests others sent it (another router, direct clients)
                unseen, unseen_running = b.unseen_load()
                if unseen > 0:
                    cost += unseen * self._mean_prefill
                    ttft += unseen * self._mean_prefill
                if unseen_running > 0:  # decoding beside it: its decode slows, its prefill stalls theirs
                    cost += unseen_running * (own_decode + self.stall_weight * own)
            pinned = b.held_blocks
            if fresh and s.kv_usage is not None and s.kv_usage * cap > pinned:
                pinned = s.kv_usage * cap
            short = pinned + (full_blocks - m) + out_blocks - cap
            if short > 0:  # it waits for a running request to end, or preempts one that recomputes
                wait = b.soonest_end(t) / env.time_scale if env.time_scale > 0 else 0.0
                cost += self.memory_weight * short * ppb + wait
                ttft += wait
            if ctx.lora is not None:
                if ctx.lora not in b.adapters:  # it loads the adapter first
                    free = s.free_lora_slots()
                    load = self.lora_load_s + (self.lora_swap_s if free == 0 else 0.0)
                    cost += load
                    ttft += load
                if s.max_loras is not None and self.lora_slot_weight:
                    wait = b.lora_slot_wait(ctx.lora, t, s.max_loras)
                    if wait > 0.0:
                        wait = self.lora_slot_weight * wait / env.time_scale if env.time_scale > 0 else 0.0
                        cost += wait
                        ttft += wait
            overflow = held + (full_blocks - m) - cap
            if overflow > 0 and not cold:
                cost += self.eviction_weight * overflow * ppb
            out.append(cost)
            ttfts.append(ttft)
            fits.append(m >= deepest or (affordable and (overflow <= 0 or cold)))
        return out

    def observe(self, ctx: RequestContext, backend: Backend) -> None:
        """The router sent `ctx` to `backend`: note the pick for the tie rotation and count a use of the
        deepest block it matched there (a prefix matched by `shared_after` requests becomes hot for
        `hot_horizon_s`). Bounded: REUSE_ENTRIES prefixes are remembered, oldest forgotten first."""
        self._picks += 1
        self._last_pick[backend.url] = self._picks
        m = ctx.matched(backend)
        if m:
            h = ctx.hashes[m - 1]
            reuse = self._reuse
            n = reuse[h] = reuse.pop(h, 0) + 1
            if len(reuse) > REUSE_ENTRIES:
                del reuse[next(iter(reuse))]
            if n >= self.hot_after:
                self._hot_prefixes().touch(h, m, now(), self.env.time_scale)

    def hot_footprint(self) -> float:
        """Blocks of the hot shared prefixes still in use (each counted once; hot_prefixes.py)."""
        return self._hot_prefixes().footprint(now())

    def _hot_prefixes(self) -> HotPrefixes:
        """The hot-prefix tracker with this policy's tunables (--policy-param sets them after __init__)."""
        hot = self._hot
        hot.horizon_s, hot.silence_gaps, hot.min_life_s = self.hot_horizon_s, self.hot_silence_gaps, self.hot_min_life_s
        return hot

    def reset(self) -> None:
        """Forget reuse counts, hot prefixes and the rotation (the backends' caches were reset)."""
        self._reuse.clear()
        self._hot.clear()
        self._last_pick.clear()

    def forget_backend(self, url: str) -> None:
        """`url` left the registry: drop its place in the rotation."""
        self._last_pick.pop(url, None)

    def _stay_home(self, ctx: RequestContext, candidates: Sequence[Backend], costs: list[float], choice: int) -> int:
        """A chat session's next turn stays on the backend holding its history unless that is worse by
        more than `move_valve_s`: moving a session moves all its later turns, and sessions that
        arrive together come back together, so moves made when the home looks momentarily busy pile
        sessions onto whichever backend's wave was thinking (multiturn, `docs/results/`)."""
        matches = ctx.matches
        if not matches:
            return choice
        m = max(matches.values())
        if m < 2 or matches.get(candidates[choice].url, 0) >= m or m * (ctx.block_size or self.env.block_size) < self.home_share * ctx.num_tokens:
            return choice
        home = next((i for i, b in enumerate(candidates) if matches.get(b.url, 0) == m), None)
        if home is None:  # the history's backend is not a candidate (unhealthy, other model)
            return choice
        deepest = ctx.hashes[m - 1]
        if not self.env.index.is_prompt_end(deepest) or self._reuse.get(deepest, 0) >= self.shared_after:
            return choice
        if costs[home] - costs[choice] > self.move_valve_s:
            return choice
        return home

    def _session_home(self, ctx: RequestContext, candidates: Sequence[Backend], costs: list[float], choice: int) -> int:
        """Soft session affinity: home unless it costs more than `session_valve_s` over the choice."""
        home = next((i for i, b in enumerate(candidates) if b is ctx.session_home), None)
        if home is None or costs[home] - costs[choice] > self.session_valve_s:
            return choice
        return home

    def _ttft_band(self, costs: list[float]) -> list[float]:
        """Costs with every backend whose predicted TTFT is beyond the band around the fastest one
        priced out. The band's reference is the fastest backend that holds the prefix or can take a
        copy without evicting, so a scarce cache (RAG) keeps its affinity."""
        ttfts, fits = self._ttft, self._fits
        ref = [x for x, f in zip(ttfts, fits) if f]
        fastest = min(ref) if ref else min(ttfts)
        limit = fastest + max(self.ttft_slack_s, self.ttft_slack_rel * fastest)
        return [c if x <= limit else float("inf") for c, x in zip(costs, ttfts)]

    def pick(self, ctx: RequestContext, candidates: Sequence[Backend]) -> Decision:
        """The cheapest of `candidates` (non-empty) after the TTFT band, ties broken by rotation, free
        cache and rendezvous hash, a chat turn kept home; the Decision carries its matched blocks and
        cost. Does not record the pick (the router calls `observe`)."""
        raw = self.costs(ctx, candidates)
        costs = self._ttft_band(raw) if self.ttft_band > 0 else raw
        best = min(costs)
        tol = self.tie_blocks * self.overlap_weight * self.env.profile.prefill_per_block + 1e-12
        # Within tie_s only backends holding as much of this prompt as the cheapest one tie, within
        # tol those holding at most tie_blocks fewer: a rotation (or, between replicas that do not
        # share it, the fewest-blocks rule) never gives away more cached blocks than it calls a tie.
        m_best = ctx.matched(candidates[costs.index(best)])
        m_tol = m_best - self.tie_blocks
        tie_s = self.tie_s + 1e-12
        index = self.env.index
        # Ties ranked by (last picked, blocks held), then the highest rendezvous weight; the weights
        # are computed only when the first two are equal (with rotation on, rarely after warm-up).
        key = choice_w = None
        choice, choice_rank = 0, None
        last = self._last_pick
        for i, b in enumerate(candidates):
            gap = costs[i] - best
            if gap > tol and gap > tie_s:
                continue
            m = ctx.matched(b)
            if (gap <= tol and m >= m_tol) or (gap <= tie_s and m >= m_best):
                rank = (last.get(b.url, -1) if self.tie_rotate > 0 else 0, index.num_blocks(b.url))
                if choice_rank is None or rank < choice_rank:
                    choice, choice_rank, choice_w = i, rank, None
                elif rank == choice_rank:
                    if key is None:
                        key = request_key(ctx.hashes, ctx.num_tokens)
                    if choice_w is None:
                        choice_w = weight(key, candidates[choice].url)
                    w = weight(key, b.url)
                    if w > choice_w:
                        choice, choice_w = i, w
        choice = self._stay_home(ctx, candidates, raw, choice)
        if ctx.session_home is not None:
            choice = self._session_home(ctx, candidates, raw, choice)
        b = candidates[choice]
        return Decision(b, ctx.matched(b), f"cost={raw[choice]:.4f}s")
