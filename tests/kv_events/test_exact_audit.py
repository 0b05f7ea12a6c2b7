"""No silent zero overlap. A new user's mistake, reproduced with real emulators and real ZMQ: the
backend's event endpoint is `tcp://127.0.0.1:P` (so it connects, as vLLM does, instead of binding)
and the proxy connects too; nothing ever flows, yet the replay socket answers "nothing buffered" and
the proxy reports `exact`. The proxy must notice from the answers' cached_tokens (or from the
backend's prefix-cache counters growing with no event arriving), leave exact mode for that backend,
say so in the log, /admin/backends and a metric, and keep routing on the approximate index. And
the audit itself, on the real follower and index: a right view is never distrusted, a distrusted
one is trusted again once answers agree with it."""
from __future__ import annotations

import logging
import socket

import aiohttp
import pytest

from proxy.config import ProxyConfig
from proxy.index.exact_audit import MISSES, NO_EVENTS, ExactViewAudit
from proxy.index.kv_events import KVEventsFollower, KVEventSource
from proxy.index.prefix_index import PrefixIndex
from proxy.app import start_proxy

from .helpers import eventually
from .test_exact_routing import BLOCK, TIME_SCALE, Cluster, kv_config

pytestmark = pytest.mark.timeout(60)
MODEL = "meta-llama/Llama-2-13b-hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


async def miswired(cluster: Cluster, metrics_interval: float):
    port = free_port()
    em = await cluster.emulator(kv_events_config=kv_config(endpoint=f"tcp://127.0.0.1:{port}"), num_gpu_blocks=65,
                                max_model_len=1024)
    from emulator.server import STATE

    replay = em.app[STATE].kv_events.replay_last_endpoint
    cfg = ProxyConfig(port=0, backends=[em.url], time_scale=TIME_SCALE, health_interval=0.1,
                      metrics_interval=metrics_interval, kv_events=[f"tcp://127.0.0.1:{port}?topic=kv-events&replay={replay}"])
    proxy = await start_proxy(cfg)
    cluster.proxies.append(proxy)
    await eventually(lambda: proxy.router.kv_events.is_exact(em.url), what="exact mode from the empty replay")
    return em, proxy


async def send(client, prompt) -> tuple[int, int]:
    raw = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=1)
    resp = raw.parse()
    return int(raw.headers["x-kvroute-matched-blocks"]), resp.usage.prompt_tokens_details.cached_tokens


async def admin_and_metrics(proxy) -> tuple[dict, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/admin/backends") as r:
            backend = (await r.json())["backends"][0]
        async with http.get(proxy.url + "/metrics") as r:
            return backend, await r.text()


async def test_a_miswired_event_socket_is_caught_by_the_answers_and_routing_goes_approximate(cluster, caplog):
    em, proxy = await miswired(cluster, metrics_interval=60.0)  # one scrape at start: the answers decide
    client = cluster.client(proxy)
    p = [3000 + k for k in range(20 * BLOCK + 3)]
    caplog.set_level(logging.WARNING, logger="kvroute.proxy.kv_events")
    seen = [await send(client, p) for _ in range(5)]
    # First answer: nothing cached, nothing predicted. Then 4 repeats the backend had cached and the
    # "exact" view did not: the 4th leaves exact mode.
    assert seen[0] == (0, 0) and all(s == (0, 20 * BLOCK) for s in seen[1:4]), seen
    assert proxy.router.kv_events.mode(em.url) == "approximate"
    backend, metrics = await admin_and_metrics(proxy)
    assert backend["index_mode"] == "approximate" and backend["exact_audit"]["untrusted"] == MISSES
    assert f'kvroute_exact_view_untrusted{{backend="{em.url}",reason="{MISSES}"}} 1.0' in metrics
    warned = [r for r in caplog.records if "exact view untrusted" in r.getMessage()]
    assert len(warned) == 1
    # Routed on the approximate index now, the proxy predicts what the backend has.
    for _ in range(3):
        matched, cached = await send(client, p)
        assert matched * BLOCK == cached == 20 * BLOCK
    assert len([r for r in caplog.records if "exact view untrusted" in r.getMessage()]) == 1  # said once


async def test_a_miswired_event_socket_is_caught_by_the_prefix_cache_counters(cluster):
    em, proxy = await miswired(cluster, metrics_interval=0.05)
    client = cluster.client(proxy)
    audit = proxy.router.exact_audit
    # The counters' baseline is the first scrape taken in exact mode: wait for it, or on a slow machine
    # every request may finish before it and leave no growth to see.
    await eventually(lambda: em.url in audit.states and audit.states[em.url].batches is not None,
                     what="a scrape of the counters in exact mode")
    for i in range(12):  # distinct prompts: no answer can miss, only the counters can tell
        await send(client, [5000 + 400 * i + k for k in range(10 * BLOCK)])
        if i >= 2 and proxy.router.kv_events.mode(em.url) == "approximate":
            break
    await eventually(lambda: proxy.router.kv_events.mode(em.url) == "approximate", what="leaving exact mode")
    backend, metrics = await admin_and_metrics(proxy)
    assert backend["exact_audit"]["untrusted"] == NO_EVENTS and "no KV event" in backend["exact_audit"]["why"]
    assert f'kvroute_exact_view_untrusted{{backend="{em.url}",reason="{NO_EVENTS}"}} 1.0' in metrics


async def test_a_wired_event_socket_stays_exact_under_repeats(cluster):
    """The control: the same traffic with events flowing never leaves exact mode."""
    em = await cluster.emulator(num_gpu_blocks=65, max_model_len=1024)
    proxy = await cluster.proxy()
    client = cluster.client(proxy)
    p = [3000 + k for k in range(20 * BLOCK + 3)]
    for i in range(8):
        matched, cached = await send(client, p if i % 2 else [7000 + 50 * i + k for k in range(6 * BLOCK)])
        if i % 2 and i > 1:
            assert matched * BLOCK == cached == 20 * BLOCK
    assert proxy.router.kv_events.mode(em.url) == "exact"
    assert proxy.router.exact_audit.describe(em.url)["untrusted"] is None


def test_the_audit_distrusts_a_view_that_keeps_missing_and_trusts_it_again_when_answers_agree():
    index = PrefixIndex(100)
    follower = KVEventsFollower(index)
    url = "http://b"
    index.add_backend(url)
    follower.follow(url, KVEventSource("tcp://127.0.0.1:1"))  # not started: events are fed through its sink below
    follower.resynced(url)
    audit = ExactViewAudit(follower)
    hashes = [11, 12, 13, 14]
    for _ in range(3):
        audit.observe_answer(url, audit.predict(url, hashes), 4, True, 70, 64, 16)  # backend had 4 blocks, the view none
    assert follower.is_exact(url)  # 3 misses: not yet
    audit.observe_answer(url, audit.predict(url, hashes), 4, True, 70, 0, 16)  # an agreeing answer resets the count
    for _ in range(3):
        audit.observe_answer(url, audit.predict(url, hashes), 4, True, 70, 64, 16)
    assert follower.is_exact(url)
    audit.observe_answer(url, audit.predict(url, hashes), 4, True, 70, 64, 16)
    assert not follower.is_exact(url) and follower.mode(url) == "approximate"
    follower.stored(url, hashes, None, [], 16)  # the events catch up
    for _ in range(audit.agree_limit):
        audit.observe_answer(url, audit.predict(url, hashes), 4, True, 70, 64, 16)
    assert follower.is_exact(url)
    assert index.match(hashes) == {url: 4}
