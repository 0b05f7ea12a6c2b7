"""What sharing costs a replica in CPU per request, against routing the same requests alone, in one run.

    python -m benchmarks.replica_cost [--requests 3000] [--documents 8]

Three routers in one process, on the same rag-like prompts (documents of ~2,000 tokens plus a
question, as text: lazily tokenized as the proxy does): `alone` has no peers; `a` publishes its
facts (a real ZMQ PUB over ipc://) and `b` follows `a`. Per request it prints the routing work
alone (decide + begin + first byte + end), what `a`'s hooks add on the request path, `a`'s batched
publishing (msgpack + send, every 2 ms) and `b`'s applying of one peer's request - the part that
grows with the number of replicas: each replica applies every other replica's requests.
Times are this thread's CPU time (`time.thread_time`), so a loaded machine's scheduling does not count.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time

from proxy.config import ProxyConfig
from proxy.replicas.sync import ReplicaSync
from proxy.routing.router import Router

URLS = [f"http://127.0.0.1:{20000 + i}" for i in range(4)]


def _router() -> Router:
    r = Router(ProxyConfig(backends=URLS, strategy="kv_aware", time_scale=1000.0).routing())
    for u in URLS:
        r.add_backend(u)
    return r


def _prompts(n: int, documents: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(f"d{d}w{rng.randrange(10_000)}" for _ in range(1000)) for d in range(documents)]
    return [f"{docs[rng.randrange(documents)]}\nQuestion {i}: what about {rng.randrange(10_000)}?" for i in range(n)]


def _serve(r: Router, text: str) -> None:
    ctx = r.text_context(text, 64)
    rec = r.begin(ctx, r.decide(ctx))
    r.first_byte(rec)
    r.end(rec)


class _Timed:
    """Wraps a method and adds up the CPU time spent in it."""

    def __init__(self, obj, name: str) -> None:
        self.total = 0.0
        self.calls = 0
        inner = getattr(obj, name)

        def wrapped(*a, **k):
            t0 = time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                self.total += time.thread_time() - t0
                self.calls += 1

        setattr(obj, name, wrapped)


async def run(requests: int, documents: int) -> dict[str, float]:
    prompts = _prompts(requests, documents)
    d = tempfile.mkdtemp(prefix="kvroute-cost-")
    alone, a, b = _router(), _router(), _router()
    sa = ReplicaSync(a, f"ipc://{d}/a", heartbeat=5.0)
    await sa.start()
    sb = ReplicaSync(b, f"ipc://{d}/b", [f"ipc://{d}/a"], heartbeat=5.0)
    await sb.start()
    try:
        peer = sb.peers[f"ipc://{d}/a"]
        deadline = time.monotonic() + 30
        while not peer.synced:
            if time.monotonic() > deadline:
                raise RuntimeError("b did not follow a")
            await asyncio.sleep(0.01)
        hooks = [_Timed(sa, name) for name in ("begun", "first_byte", "ended")]
        flush = _Timed(sa, "_flush")
        apply = _Timed(sb, "apply")
        for p in prompts[:200]:  # warm both the same way (tokenizer caches, index)
            _serve(alone, p)
        t_alone = t_shared = 0.0
        for i, p in enumerate(prompts):
            t0 = time.thread_time()
            _serve(alone, p)
            t1 = time.thread_time()
            _serve(a, p)
            t2 = time.thread_time()
            t_alone += t1 - t0
            t_shared += t2 - t1
            if i % 8 == 7:
                await asyncio.sleep(0.002)  # let the flush and b's subscriber run, as between requests
        deadline = time.monotonic() + 30
        while peer.stats.last_seq is None or peer.stats.last_seq < sa.publisher.next_seq - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("b did not apply every batch")
            await asyncio.sleep(0.01)
        n = len(prompts)
        # What the follower would route: the same matches as the publisher for every prompt seen.
        same = all(a.text_context(p, 64).matches == b.text_context(p, 64).matches for p in prompts[-200:])
        return {"alone_us": 1e6 * t_alone / n, "hooks_us": 1e6 * sum(h.total for h in hooks) / n,
                "shared_us": 1e6 * t_shared / n,
                "publish_us": 1e6 * flush.total / n, "apply_us": 1e6 * apply.total / n,
                "same_matches": float(same)}
    finally:
        await sb.close()
        await sa.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replica_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--documents", type=int, default=8)
    ns = ap.parse_args(argv)
    r = asyncio.run(run(ns.requests, ns.documents))
    base = r["alone_us"]
    print(f"routing alone: {base:.1f} us/request (decide + begin + first byte + end, lazily tokenized text)")
    print(f"routing with a peer: {r['shared_us']:.1f} us/request, of which the hooks (queueing facts): "
          f"{r['hooks_us']:.1f} us ({r['hooks_us'] / base:.1%})")
    print(f"sharing, publishing (batched, off the request path): {r['publish_us']:.1f} us ({r['publish_us'] / base:.1%})")
    print(f"sharing, applying one peer's request: {r['apply_us']:.1f} us ({r['apply_us'] / base:.1%}); "
          f"a replica of N applies N-1 of these per request it serves")
    print(f"the follower matches the last 200 prompts as the publisher does: {bool(r['same_matches'])}")


if __name__ == "__main__":
    main()
