"""A proxy in front of the two real vLLM servers, configured as docs/real-vllm.md tells a user to."""
from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from proxy.config import ProxyConfig
from proxy.app import RunningProxy, start_proxy

from ..kv_events.helpers import eventually
from .conftest import VLLMPair
from .vllm_server import BLOCK_SIZE, MODEL_NAME, NUM_BLOCKS


def backends_file(tmp: Path, pair: VLLMPair, exact: bool, key_a: str | None = "<right>") -> str:
    """The JSON backends file: server a with its API key, both with their KV-event sources when `exact`."""
    entries: list[dict[str, Any]] = []
    for s in pair.servers:
        e: dict[str, Any] = {"url": s.url}
        if exact:
            e["kv_events"] = {"endpoint": s.endpoint, "topic": "kv-events", "replay_endpoint": s.replay_endpoint}
        key = (s.api_key if key_a == "<right>" else key_a) if s is pair.a else None
        if key:
            e["api_key"] = key
        entries.append(e)
    path = tmp / f"backends-{'exact' if exact else 'approx'}.json"
    path.write_text(json.dumps(entries))
    return str(path)


_current: list[RunningProxy] = []  # the proxy `complete` and `chat` settle against


async def published_through(replay_endpoint: str, after: int) -> int:
    """The last seq a vLLM publisher has sent, asked of its replay socket (events after `after`)."""
    import zmq
    import zmq.asyncio

    from kvblocks.kv_events import REPLAY_END_SEQ, parse_replay_reply, replay_request

    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.connect(replay_endpoint)
    try:
        await sock.send_multipart(replay_request(after + 1))
        last = after
        while True:
            seq, _ = parse_replay_reply(await asyncio.wait_for(sock.recv_multipart(), 10))
            if seq == REPLAY_END_SEQ:
                return last
            last = max(last, seq)
    finally:
        sock.close(linger=0)


async def settle_events(p: RunningProxy) -> None:
    """Wait until the proxy has applied every KV event its exact backends published so far.

    vLLM publishes events from a thread, so an answer can reach the client before the events of its
    own prefill (or of the evictions it caused) reach the proxy: a request sent at once may be routed on
    a view one step old. The tests that compare matched blocks with cached_tokens request by request
    take the replay socket's last seq as a barrier before the next request."""
    follower = p.router.kv_events
    for url, sub in list(follower.subscribers.items()):
        ep = sub.source.replay_endpoint
        if not ep or not follower.is_exact(url) or sub.stats.last_seq is None:
            continue
        last = await published_through(ep, sub.stats.last_seq)
        await eventually(lambda: sub.stats.last_seq is not None and sub.stats.last_seq >= last or not follower.is_exact(url),
                         timeout=10,
                         what=f"KV events through seq {last} applied")


@asynccontextmanager
async def proxy_for(pair: VLLMPair, tmp: Path, exact: bool, tokenizer: str | None = None, wait_exact: bool = True, **kw):
    """A proxy over both servers; ready once it hashes as vLLM does (32-token blocks, scraped from
    vllm:cache_config_info) and, when `exact`, follows both servers' KV events."""
    cfg = ProxyConfig(
        port=0, backends_file=backends_file(tmp, pair, exact, kw.pop("key_a", "<right>")),
        tokenizer=tokenizer or str(pair.a.model), health_interval=2.0, metrics_interval=0.5,
        kv_events_silence_timeout=30.0, **kw,
    )
    p = await start_proxy(cfg)
    try:
        r = p.router
        urls = [s.url for s in pair.servers]
        await eventually(lambda: r.hasher.block_size == BLOCK_SIZE, timeout=60, what="block size from cache_config_info")
        # (a backend kept out for refusing our key is never scraped)
        await eventually(lambda: all(r.index.capacity(u) == NUM_BLOCKS - 1 for u in urls if r.registry.get(u).healthy),
                         timeout=60, what="capacity")
        if exact and wait_exact:
            # (a loaded machine has taken over a minute to answer the replay request after earlier tests)
            await eventually(lambda: all(r.kv_events.is_exact(u) for u in urls), timeout=180, what="exact mode on real vLLM")
        _current.append(p)
        yield p
    finally:
        if p in _current:
            _current.remove(p)
        await p.stop()


def client(p: RunningProxy) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def complete(c: AsyncOpenAI, prompt: str, salt: str | None = None, max_tokens: int = 4) -> tuple[int | None, int, str]:
    """(matched blocks the proxy believed, blocks vLLM reported cached, backend) for one completion; the
    first is None under a strategy that does not read the prompt (round robin claims no match)."""
    extra = {"cache_salt": salt} if salt else None
    raw = await c.completions.with_raw_response.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, extra_body=extra)
    out = raw.parse()
    cached = out.usage.prompt_tokens_details.cached_tokens or 0
    if _current:
        await settle_events(_current[-1])
    matched = raw.headers.get("x-kvroute-matched-blocks")
    return None if matched is None else int(matched), cached // BLOCK_SIZE, raw.headers["x-kvroute-backend"]


async def chat(c: AsyncOpenAI, messages: list[dict], max_tokens: int = 8) -> tuple[int, int, str, str]:
    raw = await c.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=messages,
                                                            max_tokens=max_tokens, temperature=0)
    out = raw.parse()
    cached = out.usage.prompt_tokens_details.cached_tokens or 0
    if _current:
        await settle_events(_current[-1])
    return (int(raw.headers["x-kvroute-matched-blocks"]), cached // BLOCK_SIZE, raw.headers["x-kvroute-backend"],
            out.choices[0].message.content or "")


async def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a Prometheus series' samples at `url`/metrics whose labels include `labels`."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([^{ ]+)(?:\{([^}]*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if labels and any(got.get(k) != v for k, v in labels.items()):
            continue
        total += float(m.group(3))
    return total
