"""Replicas that share what they route (proxy/replicas/), over real ZMQ sockets on loopback.

Real emulators, real proxies (in this process, or `python -m proxy` children where one is killed),
real HTTP. Every wait polls a condition with a bound.
"""
from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy
from tests.reliability.helpers import ServerProcess, metric_samples, wait_for, wait_for_async

TIME_SCALE = 0.01
DOCS = ["alpha", "beta", "gamma", "delta"]


def prompt(doc: str, q: int) -> str:
    return f"Document {doc}. " + " ".join(f"{doc}{i}" for i in range(400)) + f"\nQuestion {q}?"


def same_index(a, b) -> bool:
    ia, ib = a.router.index, b.router.index
    return len(ia) > 0 and all(ia.lru(u) == ib.lru(u) for u in ia.backends())


async def post(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int = 4, stream: bool = False):
    async with session.post(url + "/v1/completions", json={"prompt": text, "max_tokens": max_tokens, "stream": stream}) as r:
        await r.read()
        return r.status, r.headers.get("x-kvroute-backend"), int(r.headers.get("x-kvroute-matched-blocks", 0))


@pytest.fixture
async def emulators():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False), 3)
    yield ems
    for e in ems:
        await e.stop()


@pytest.fixture
def base(emulators, tmp_path) -> ProxyConfig:
    return ProxyConfig(port=0, backends=[e.url for e in emulators], time_scale=TIME_SCALE, replica_heartbeat=0.25,
                       health_interval=0.2, metrics_interval=0.2)


async def test_late_joiner_converges_on_index_and_in_flight(tmp_path):
    """B starts after A routed 12 prompts and while one of A's requests is in flight: A's snapshot gives
    B A's index and A's request as load; B then routes each known document where A's prefix lives,
    and A learns B's routes."""
    scale = 0.1  # slow enough that a 1000-token answer is still decoding when B has joined
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=scale, log_requests=False), 3)
    base = ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=scale, replica_heartbeat=0.25)
    a = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/a", peers=[f"ipc://{tmp_path}/b"]))
    b = None
    try:
        async with aiohttp.ClientSession() as s:
            placed = {}
            for q in range(12):
                status, backend, _ = await post(s, a.url, prompt(DOCS[q % 4], q))
                assert status == 200
                placed[DOCS[q % 4]] = backend
            slow = asyncio.create_task(post(s, a.url, prompt("epsilon", 0), max_tokens=1000))
            await wait_for(lambda: a.router.registry.total_in_flight() == 1, what="A's slow request in flight")
            b = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/b", peers=[f"ipc://{tmp_path}/a"]))
            await wait_for(lambda: same_index(a, b), what="B's index equal to A's")
            await wait_for(lambda: b.router.registry.total_in_flight() == 1, what="A's request counted by B")
            assert a.router.replicas.publisher.snapshots_served >= 1
            for q, doc in enumerate(DOCS):
                status, backend, matched = await post(s, b.url, prompt(doc, 100 + q))
                assert status == 200 and backend == placed[doc] and matched >= 20, (doc, backend, matched)
            assert (await slow)[0] == 200
            await wait_for(lambda: b.router.registry.total_in_flight() == 0 == a.router.registry.total_in_flight(),
                           what="in-flight back to zero on both")
            await wait_for(lambda: same_index(a, b), what="A learnt B's routes too")
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
        for e in ems:
            await e.stop()


async def test_dropped_message_is_detected_and_resynced(base, tmp_path):
    """A batch A publishes never reaches B: B sees the gap on A's next batch, counts it, replays it from
    A's ROUTER and ends with A's index; its metric says so."""
    a = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/a"))
    sync_a = a.router.replicas
    b = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/b", peers=[sync_a.endpoint]))
    try:
        sync_b = b.router.replicas
        peer = sync_b.peers[sync_a.endpoint]
        await wait_for(lambda: peer.synced, what="B following A")
        async with aiohttp.ClientSession() as s:
            snapshots = sync_a.publisher.snapshots_served  # B's join
            sync_a.publisher.drop_seq = sync_a.publisher.next_seq  # the next batch is lost on the wire
            assert (await post(s, a.url, prompt("alpha", 1)))[0] == 200
            await wait_for(lambda: sync_a.publisher.next_seq > sync_a.publisher.drop_seq + 1, what="A publishing on")
            await wait_for(lambda: peer.stats.desyncs["gap"] == 1 and peer.synced, what="gap detected and resynced")
            await wait_for(lambda: same_index(a, b), what="B's index equal to A's after the replay")
            assert sync_a.publisher.snapshots_served == snapshots  # the lost batch came from the ring
            async with s.get(b.url + "/metrics") as r:
                text = await r.text()
            gaps = metric_samples(text, "kvroute_replica_desync_total")
            assert gaps[(("peer", sync_a.endpoint), ("reason", "gap"))] == 1
            assert metric_samples(text, "kvroute_replica_peers")[(("state", "synced"),)] == 1
    finally:
        await b.stop()
        await a.stop()


def _proxy_args(base: ProxyConfig, bind: str, peer: str) -> list[str]:
    args = ["--port", "0", "--time-scale", str(TIME_SCALE), "--replica-bind", bind, "--peer", peer,
            "--replica-heartbeat", "0.25", "--health-interval", "0.2"]
    for u in base.backends:
        args += ["--backend", u]
    return args


async def test_killing_a_replica_loses_no_request_on_the_other(base, emulators, tmp_path):
    """Two `python -m proxy` replicas under load; one is SIGKILLed mid-run. Every request to the other
    completes, it says the peer is lost (admin + metric), and the dead one's in-flight requests stop
    counting as load on it."""
    a_bind, b_bind = f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"
    a = ServerProcess("proxy", _proxy_args(base, a_bind, b_bind), "listening on")
    b = ServerProcess("proxy", _proxy_args(base, b_bind, a_bind), "listening on")
    try:
        async with aiohttp.ClientSession() as s:
            async def peers_state(url: str) -> dict:
                async with s.get(url + "/admin/backends") as r:
                    return (await r.json())["replicas"]

            async def synced() -> bool:
                states = [await peers_state(u) for u in (a.url, b.url)]
                return all(p["synced"] for st in states for p in st["peers"])

            await wait_for_async(synced, what="both replicas following each other")

            async def client(url: str, n: int, tag: str) -> list[int]:
                return [(await post(s, url, prompt(DOCS[i % 4], i) + tag, max_tokens=30))[0] for i in range(n)]

            on_a = [asyncio.create_task(client(a.url, 40, f"a{k}")) for k in range(4)]
            on_b = [asyncio.create_task(client(b.url, 12, f"b{k}")) for k in range(6)]

            async def b_counts_a() -> bool:
                st = await peers_state(b.url)
                return st["peers"][0]["in_flight"] > 0

            await wait_for_async(b_counts_a, what="B counting A's requests in flight")
            a.proc.send_signal(signal.SIGKILL)
            results = await asyncio.gather(*on_b)
            assert all(code == 200 for r in results for code in r), results
            await asyncio.gather(*on_a, return_exceptions=True)

            async def lost_and_idle() -> bool:
                st = await peers_state(b.url)
                async with s.get(b.url + "/admin/backends") as r:
                    backends = (await r.json())["backends"]
                return st["peers_lost"] == 1 and all(x["in_flight"] == 0 for x in backends)

            await wait_for_async(lost_and_idle, what="B: peer lost, in-flight back to zero")
            async with s.get(b.url + "/metrics") as r:
                text = await r.text()
            assert metric_samples(text, "kvroute_replica_peers")[(("state", "lost"),)] == 1
            assert sum(metric_samples(text, "kvroute_backend_in_flight").values()) == 0
            assert (await post(s, b.url, prompt("alpha", 999)))[0] == 200  # still routing
    finally:
        a.stop()
        b.stop()
        for p in (f"{tmp_path}/a", f"{tmp_path}/a.replay"):
            if os.path.exists(p):
                os.unlink(p)


async def test_a_peers_adapter_requests_hold_slots_in_the_other_replicas_view(tmp_path):
    """A's request on an adapter reaches B with its adapter (the BEGIN fact's `lora`), so B's kv_aware
    sees that backend's adapter slots taken by it (Backend.loras), and frees them when it ends."""
    scale = 0.1  # a 1000-token answer is still decoding while B looks
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=scale, log_requests=False,
                                               lora_modules=["sql=/adapters/sql"], max_loras=1), 2)
    base = ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=scale, replica_heartbeat=0.25,
                       health_interval=0.2, metrics_interval=0.2)
    a = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/a", peers=[f"ipc://{tmp_path}/b"]))
    b = await start_proxy(replace(base, replica_bind=f"ipc://{tmp_path}/b", peers=[f"ipc://{tmp_path}/a"]))
    try:
        await wait_for(lambda: all(x.adapters for p in (a, b) for x in p.router.registry), what="adapters learned")
        async with aiohttp.ClientSession() as s:
            async def slow():
                async with s.post(a.url + "/v1/completions", json={"model": "sql", "prompt": prompt("alpha", 0),
                                                                   "max_tokens": 1000}) as r:
                    await r.read()
                    return r.status
            task = asyncio.create_task(slow())
            await wait_for(lambda: a.router.registry.total_in_flight() == 1, what="A's adapter request in flight")
            home = next(x.url for x in a.router.registry if x.in_flight)
            await wait_for(lambda: b.router.registry.get(home).loras == {"sql": 1}, what="B counting A's adapter")
            assert await task == 200
            await wait_for(lambda: all(not x.loras for x in b.router.registry), what="B's adapter counts back to zero")
    finally:
        await b.stop()
        await a.stop()
        for e in ems:
            await e.stop()
