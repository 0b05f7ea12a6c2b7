"""End to end: real emulators publish KV events over real ZMQ, real proxies follow them, the real openai
SDK sends the traffic. The proxy's index must equal the emulators' caches, react to evictions it did
not cause, fall back when a publisher drops and recover, and agree across proxy replicas."""
from __future__ import annotations

import dataclasses

import aiohttp
import pytest
from openai import AsyncOpenAI

from emulator.config import EmulatorConfig
from emulator.server import STATE, RunningEmulator, start_emulator
from kvblocks import hash_to_int
from proxy.config import ProxyConfig
from proxy.app import RunningProxy, start_proxy

from .helpers import eventually

TIME_SCALE = 0.01
NUM_GPU_BLOCKS = 9  # 8 usable (block 0 is vLLM's null block): 2 prompts of 3 blocks + change
BLOCK = 16


def kv_config(endpoint: str = "tcp://127.0.0.1:*", replay: str | None = "tcp://127.0.0.1:*") -> dict:
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "replay_endpoint": replay, "topic": "kv-events"}


def truth(em: RunningEmulator) -> set[int]:
    """The emulator's cached blocks, in the int form its events carry."""
    return {hash_to_int(h) for h in em.engine.block_pool.cached_block_hash_to_block}


def source_flag(em: RunningEmulator) -> str:
    pub = em.app[STATE].kv_events
    return f"{pub.last_endpoint}?topic=kv-events&replay={pub.replay_last_endpoint}"


def prompt(i: int, n_blocks: int = 3) -> list[int]:
    """Token ids of a distinct prompt (distinct from its first token, so no block is shared)."""
    return [1000 + 500 * i + k for k in range(n_blocks * BLOCK)]


class Cluster:
    def __init__(self) -> None:
        self.emulators: list[RunningEmulator] = []
        self.proxies: list[RunningProxy] = []
        self.clients: list[AsyncOpenAI] = []

    async def emulator(self, **kw) -> RunningEmulator:
        blocks = kw.get("num_gpu_blocks", NUM_GPU_BLOCKS)  # max_model_len must fit the cache, as vLLM checks
        cfg = EmulatorConfig(**{"port": 0, "time_scale": TIME_SCALE, "log_requests": False, "num_gpu_blocks": NUM_GPU_BLOCKS,
                                "max_model_len": (blocks - 1) * BLOCK, "kv_events_config": kv_config(), **kw})
        em = await start_emulator(cfg)
        self.emulators.append(em)
        return em

    async def proxy(self, events: bool = True, policy_param: list[str] | None = None) -> RunningProxy:
        cfg = ProxyConfig(
            port=0, backends=[e.url for e in self.emulators], time_scale=TIME_SCALE, health_interval=0.1, metrics_interval=0.1,
            kv_events=[source_flag(e) for e in self.emulators] if events else [], policy_param=policy_param or [],
        )
        p = await start_proxy(cfg)
        self.proxies.append(p)
        if events:
            follower = p.router.kv_events
            await eventually(lambda: all(follower.is_exact(e.url) for e in self.emulators), what="exact mode")
        await eventually(lambda: all(p.router.index.capacity(e.url) == e.config.num_gpu_blocks - 1 for e in self.emulators), what="scrape")
        return p

    def client(self, target: RunningProxy | RunningEmulator) -> AsyncOpenAI:
        c = AsyncOpenAI(base_url=target.url + "/v1", api_key="x", max_retries=0)
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for p in self.proxies:
            await p.stop()
        for e in self.emulators:
            await e.stop()


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


async def complete(client: AsyncOpenAI, tokens: list[int], strategy: str | None = None) -> tuple[str, int, int]:
    """(backend chosen, matched blocks the proxy believed, cached tokens the backend reported).

    Strategy "prefix" decides from the index and the proxy's own in-flight counts only (no scraped
    load), so a decision depends on nothing but what the events told the proxy."""
    headers = {"x-kvroute-strategy": strategy} if strategy else None
    raw = await client.completions.with_raw_response.create(
        model="meta-llama/Llama-2-13b-hf", prompt=tokens, max_tokens=1, extra_headers=headers
    )
    resp = raw.parse()
    cached = resp.usage.prompt_tokens_details.cached_tokens if resp.usage.prompt_tokens_details else 0
    return raw.headers.get("x-kvroute-backend", ""), int(raw.headers.get("x-kvroute-matched-blocks", "0")), cached


def by_url(cluster: Cluster, url: str) -> RunningEmulator:
    return next(e for e in cluster.emulators if e.url == url)


async def test_events_drive_the_index_and_an_eviction_shows_in_the_next_decision(cluster):
    for _ in range(2):
        await cluster.emulator()
    proxy = await cluster.proxy()
    follower, index = proxy.router.kv_events, proxy.router.index
    client = cluster.client(proxy)
    p1 = prompt(1)
    hashes = proxy.router.hashes(p1)
    url, matched, _ = await complete(client, p1, "prefix")
    em = by_url(cluster, url)
    await eventually(lambda: set(hashes) <= follower.blocks(url), what="BlockStored of the prompt")
    assert follower.blocks(url) == truth(em) and index.num_blocks(url) == len(truth(em))
    again, matched, cached = await complete(client, p1, "prefix")
    assert (again, matched, cached) == (url, 3, 2 * BLOCK)  # the proxy knew, the backend hit (capped at n-1)

    # Traffic the proxy never saw evicts the prompt on that backend (8 usable blocks, LRU).
    direct = cluster.client(em)
    for i in (2, 3, 4):
        await direct.completions.create(model="meta-llama/Llama-2-13b-hf", prompt=prompt(i), max_tokens=1)
    await eventually(lambda: hashes[0] not in truth(em) and follower.blocks(url) == truth(em), what="BlockRemoved")
    assert index.match(hashes).get(url, 0) == 0
    _, matched, cached = await complete(client, p1, "prefix")
    assert (matched, cached) == (0, 0)  # the next decision knew the blocks were gone
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as r:
        metrics = await r.text()
    assert f'kvroute_backend_index_mode{{backend="{url}",mode="exact"}} 1.0' in metrics


async def test_an_approximate_index_keeps_believing_in_evicted_blocks(cluster):
    """The contrast: without events the proxy cannot see evictions caused by traffic it did not route."""
    for _ in range(2):
        await cluster.emulator()
    proxy = await cluster.proxy(events=False)
    client = cluster.client(proxy)
    url, _, _ = await complete(client, prompt(1), "prefix")
    em = by_url(cluster, url)
    direct = cluster.client(em)
    for i in (2, 3, 4):
        await direct.completions.create(model="meta-llama/Llama-2-13b-hf", prompt=prompt(i), max_tokens=1)
    hashes = proxy.router.hashes(prompt(1))
    assert hashes[0] not in truth(em) and proxy.router.index.match(hashes)[url] == 3
    again, matched, cached = await complete(client, prompt(1), "prefix")
    assert (again, matched, cached) == (url, 3, 0)  # believed 3 blocks, the backend had none


async def test_dropped_publisher_falls_back_to_approximate_and_recovers_exact(cluster, tmp_path):
    ems = [await cluster.emulator(kv_events_config=kv_config(f"ipc://{tmp_path}/em{i}.pub", f"ipc://{tmp_path}/em{i}.replay"))
           for i in range(2)]
    proxy = await cluster.proxy()
    follower, index = proxy.router.kv_events, proxy.router.index
    client = cluster.client(proxy)
    url, _, _ = await complete(client, prompt(1))
    hashes = proxy.router.hashes(prompt(1))
    await eventually(lambda: set(hashes) <= follower.blocks(url), what="exact prompt blocks")
    em = by_url(cluster, url)
    cluster.emulators.remove(em)
    await em.stop()  # the backend process dies, taking its publisher with it
    await eventually(lambda: not follower.is_exact(url), what="fallback to approximate")
    assert follower.subscribers[url].stats.desyncs["disconnect"] == 1

    restarted = await start_emulator(dataclasses.replace(em.config, port=em.port))  # same URL, same endpoints
    cluster.emulators.append(restarted)
    await eventually(lambda: follower.is_exact(url), what="resync with the restarted backend")
    assert follower.blocks(url) == truth(restarted) == set()  # a new process has an empty cache
    assert index.match(hashes).get(url, 0) == 0
    await eventually(lambda: proxy.router.registry.get(url).healthy, what="backend healthy again")
    others = [e for e in ems if e is not em]
    got, _, _ = await complete(client, prompt(1))
    target = by_url(cluster, got)
    await eventually(lambda: all(follower.blocks(e.url) == truth(e) for e in [*others, restarted]), what="index equals caches")
    assert set(hashes) <= follower.blocks(target.url)


async def test_two_proxy_replicas_hold_the_same_index_and_decide_alike(cluster):
    for _ in range(3):
        await cluster.emulator(num_gpu_blocks=40)
    # kv_aware rotates near-equal costs to the backend this replica routed to least recently, which
    # replicas do not share; with the rotation off (the documented way to get agreement) ties are
    # decided by the index alone.
    alike = ["kv_aware.tie_rotate=0"]
    first, second = await cluster.proxy(policy_param=alike), await cluster.proxy(policy_param=alike)
    c1, c2 = cluster.client(first), cluster.client(second)
    prompts = [prompt(i) for i in range(1, 8)]
    homes = [(await complete(c1, p))[0] for p in prompts]  # all traffic through the first replica
    assert len(set(homes)) > 1

    def idle() -> bool:  # kv_aware also weighs scraped load: both replicas must have seen the last request end
        return all(not b.scraped.waiting and not b.scraped.running for px in (first, second) for b in px.router.registry)

    def same() -> bool:
        return idle() and all(
            first.router.kv_events.blocks(e.url) == second.router.kv_events.blocks(e.url) == truth(e) for e in cluster.emulators
        )

    await eventually(same, what="replicas' indexes equal the caches and both saw the backends idle")
    for p in (prompt(i) for i in range(8, 14)):  # prompts no backend holds: every cost ties
        assert first.router.decide(first.router.context(p)).backend.url == second.router.decide(second.router.context(p)).backend.url
    for p, home in zip(prompts, homes):
        h = first.router.hashes(p)
        assert first.router.index.match(h) == second.router.index.match(h)
        # The replica that routed nothing decides the same with the default strategy (kv_aware):
        # its tie-break is deterministic (fewest indexed blocks, then rendezvous hashing), not per-process.
        assert (await complete(c2, p))[0] == home
        await eventually(idle, what="both replicas scraped the backends idle")
        assert (await complete(c1, p))[0] == home
        await eventually(idle, what="both replicas scraped the backends idle")
