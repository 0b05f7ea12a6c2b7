"""A real vLLM server restarts under the proxy (last in the folder: it costs a start-up).

The proxy must notice the lost event stream (desync), route on the approximate index meanwhile,
lose no request, and follow the new server's events exactly once it is back.
"""
from __future__ import annotations

import asyncio

import pytest

from ..kv_events.helpers import eventually
from .conftest import VLLMPair
from .helpers import MODEL_NAME, client, complete, proxy_for
from .test_proxy_real_vllm import doc

pytestmark = pytest.mark.timeout(1800)


async def test_vllm_restart_desync_fallback_resync_no_request_lost(vllm: VLLMPair, tmp_path):
    b = vllm.b
    # round robin, so both servers see traffic whatever their load; the index is what is under test
    async with proxy_for(vllm, tmp_path, exact=True, retries=2, strategy="round_robin") as p:
        follower = p.router.kv_events
        sub = follower.subscribers[b.url]
        c = client(p)
        before = [await complete(c, doc(800 + i, 200)) for i in range(4)]
        assert {x[2] for x in before} == {vllm.a.url, b.url}

        b.stop()
        await eventually(lambda: not follower.is_exact(b.url), timeout=60, what="desync after the server stopped")
        assert follower.mode(b.url) == "approximate"
        down = [await complete(c, doc(900 + i, 100)) for i in range(6)]  # every one answered (by a)
        assert {x[2] for x in down} == {vllm.a.url}

        b.start(vllm.log_dir)
        await asyncio.to_thread(b.wait_ready)
        await eventually(lambda: follower.is_exact(b.url) and p.router.registry.get(b.url).healthy, timeout=120,
                         what="exact again after the restart")
        assert sum(sub.stats.desyncs.values()) >= 1, sub.stats.desyncs
        after = []
        for i in range(9):  # round robin claims no match: ask the exact index what it holds before each request
            prompt = doc(1000 + i % 3, 200)
            held = dict(p.router.text_context(prompt, 4, MODEL_NAME, strategy="kv_aware").matches)
            _, cached, backend = await complete(c, prompt)
            after.append((held.get(backend, 0), cached, backend))
        await c.close()
    assert [m for m, _, _ in after] == [k for _, k, _ in after], after
    assert b.url in {x[2] for x in after}
