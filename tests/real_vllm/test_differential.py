"""The emulator against a real vLLM server, request for request, over HTTP and ZMQ.

Both are configured alike (32-token blocks, 128 blocks, the same step budget, sha256) and get the
same seeded sequence of token-id prompts, one at a time with max_tokens=1 (no generated token ever
fills a block, so the model's output cannot matter): shared roots, branches, exact repeats,
block-aligned and ragged lengths, prompts longer than the step budget (chunked prefill), salted
prompts, prompts for either of server b's two LoRA adapters (blocks keyed by the adapter, events
naming it), prompt_logprobs and prefix-cache resets, in a cache small enough to evict. Per request the
`cached_tokens` must be equal, and so must the KV-event batches each side published (hashes,
parents, token ids, extra keys, block size, removals, clears, and the batch boundaries), read back
through each publisher's replay socket. A mismatch prints a shrunk reproduction.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from emulator.config import EmulatorConfig
from emulator.server import STATE, RunningEmulator, start_emulator
from kvblocks.kv_events import REPLAY_END_SEQ, BlockStored, EventBatch, decode_batch, parse_replay_reply, replay_request

from ..progress import say
from .conftest import VLLMPair
from .vllm_server import BLOCK_SIZE, DIFF_BUDGET, MAX_MODEL_LEN, MODEL_NAME, NUM_BLOCKS, VLLMServer

pytestmark = pytest.mark.timeout(1800)

SCENARIOS = 10
REQUESTS = 200
SHRINK_BUDGET_S = 120.0
END_MARKER = [95_001] * BLOCK_SIZE  # a one-block prompt no scenario uses: its BlockStored ends a read
ADAPTERS = ("sql", "chat")  # server b's LoRA adapters (conftest), loaded in this order (lora_id 1, 2)


def scenario(seed: int, n: int = REQUESTS) -> list[dict[str, Any]]:
    """A seeded op list: {"prompt", "salt", "plp", "model"} requests and {"reset": True}."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    ops: list[dict[str, Any]] = []
    for _ in range(n):
        roll = rng.random()
        if prompts and roll < 0.2:
            prompt = list(rng.choice(prompts))
        elif prompts and roll < 0.55:
            base = rng.choice(prompts)
            cut = rng.randrange(1, len(base) + 1)
            prompt = base[:cut] + [rng.randrange(1000, 90000) for _ in range(rng.randrange(1, 200))]
        else:
            aligned = rng.random() < 0.4
            length = BLOCK_SIZE * rng.randrange(1, 30) if aligned else rng.randrange(1, 1200)
            prompt = [rng.randrange(1000, 90000) for _ in range(length)]
        prompt = prompt[: MAX_MODEL_LEN - 8]
        prompts.append(prompt)
        ops.append({"prompt": prompt, "salt": rng.choice(["tenant-a", "tenant-b"]) if rng.random() < 0.15 else None,
                    "plp": rng.random() < 0.08, "model": rng.choice(ADAPTERS) if rng.random() < 0.25 else MODEL_NAME})
        if rng.random() < 0.03:
            ops.append({"reset": True})
    return ops


class Side:
    """One server under test: its URL and its publisher's replay socket."""

    def __init__(self, name: str, url: str, replay: str) -> None:
        self.name, self.url, self.replay = name, url, replay
        self.seq = 0  # first batch not yet read

    async def run(self, s: aiohttp.ClientSession, op: dict[str, Any]) -> int | str:
        if op.get("reset"):
            async with s.post(self.url + "/reset_prefix_cache") as r:
                return "reset ok" if (await r.json()).get("success") else "reset refused"
        body: dict[str, Any] = {"model": op.get("model", MODEL_NAME), "prompt": op["prompt"], "max_tokens": 1, "temperature": 0}
        if op["salt"]:
            body["cache_salt"] = op["salt"]
        if op["plp"]:
            body["prompt_logprobs"] = 1
        async with s.post(self.url + "/v1/completions", json=body) as r:
            data = await r.json()
            if r.status != 200:
                return f"HTTP {r.status}: {data}"
            return (data["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    async def _replay(self) -> list[EventBatch]:
        """Every batch published since the last read, from the replay buffer (the live stream may drop)."""
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.replay)
        out: list[EventBatch] = []
        try:
            await sock.send_multipart(replay_request(self.seq))
            while True:
                assert await sock.poll(30_000), f"{self.name}: replay did not answer"
                seq, payload = parse_replay_reply(await sock.recv_multipart())
                if seq == REPLAY_END_SEQ:
                    return out
                assert seq == self.seq + len(out), f"{self.name}: replay skipped to {seq}"
                out.append(decode_batch(payload))
        finally:
            sock.close(linger=0)
            self.seq += len(out)

    async def batches_through(self, marker: list[int]) -> list[EventBatch]:
        """Batches up to and including the one storing the `marker` block, which the caller requested
        last: events are published in order, so once it is in the buffer everything before it is."""
        out: list[EventBatch] = []
        deadline = time.monotonic() + 30
        while not any(isinstance(e, BlockStored) and e.token_ids == marker for b in out for e in b.events):
            assert time.monotonic() < deadline, f"{self.name}: marker block never published"
            got = await self._replay()
            out += got
            if not got:
                await asyncio.sleep(0.05)  # the publisher thread has not sent it yet: poll, bounded above
        return out


def _events(batches: list[EventBatch]) -> list[list[dict[str, Any]]]:
    """Batches as comparable data: every event field but the timestamp."""
    return [[{"type": type(e).__name__, **asdict(e)} for e in b.events] for b in batches]


async def _play(sides: list[Side], ops: list[dict[str, Any]], marker: list[int]) -> tuple[list[tuple], list[list]]:
    """Run `ops` on every side in lock step, then a one-block `marker` prompt; (per-op results,
    per-side event batches through the marker's)."""
    results = []
    async with aiohttp.ClientSession() as s:
        for op in [*ops, {"prompt": marker, "salt": None, "plp": False}]:
            results.append(tuple([await side.run(s, op) for side in sides]))
    return results[:-1], [_events(await side.batches_through(marker)) for side in sides]


async def _settle(sides: list[Side]) -> None:
    """Start a scenario cold on both sides: reset, and read past the step that publishes the clear."""
    marker = [95_000] * BLOCK_SIZE
    async with aiohttp.ClientSession() as s:
        for side in sides:
            assert await side.run(s, {"reset": True}) == "reset ok"
            assert await side.run(s, {"prompt": marker, "salt": None, "plp": False}) == 0
    for side in sides:
        await side.batches_through(marker)


def _first_divergence(results, events) -> str | None:
    for i, r in enumerate(results):
        if r[0] != r[1]:
            return f"op {i}: vLLM {r[0]!r} vs emulator {r[1]!r}"
    if events[0] != events[1]:
        for j, (a, b) in enumerate(zip(events[0], events[1])):
            if a != b:
                return f"event batch {j}: vLLM {a} vs emulator {b}"
        return f"vLLM published {len(events[0])} batches, the emulator {len(events[1])}"
    return None


async def _shrink(sides: list[Side], ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop ops while the sides still disagree (bounded in time): the smallest reproduction found."""
    deadline = time.monotonic() + SHRINK_BUDGET_S
    chunk = max(1, len(ops) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, shrunk = 0, False
        while i < len(ops) and time.monotonic() < deadline:
            trial = ops[:i] + ops[i + chunk:]
            await _settle(sides)
            if trial and _first_divergence(*await _play(sides, trial, END_MARKER)):
                ops, shrunk = trial, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return ops


def _describe(ops: list[dict[str, Any]]) -> str:
    lines = []
    for op in ops:
        if op.get("reset"):
            lines.append("reset")
        else:
            p = op["prompt"]
            lines.append(f"prompt len {len(p)} head {p[:4]} salt {op['salt']} prompt_logprobs {op['plp']} "
                         f"model {op.get('model', MODEL_NAME)}")
    return "\n".join(lines)


async def emulator_twin(adapters: dict | None = None) -> RunningEmulator:
    """An emulator configured as server b: same block size, block count, step budget, hash and adapters
    (same names, same paths, same load order)."""
    return await start_emulator(EmulatorConfig(
        port=0, model=MODEL_NAME, block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=DIFF_BUDGET, time_scale=0.001, log_requests=False,
        lora_modules=[f"{n}={p}" for n, p in (adapters or {}).items()], max_loras=1,
        kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:*",
                          "replay_endpoint": "tcp://127.0.0.1:*", "topic": "kv-events"},
    ))


def _sides(b: VLLMServer, em: RunningEmulator) -> list[Side]:
    return [Side("vLLM", b.url, b.replay_endpoint), Side("emulator", em.url, em.app[STATE].kv_events.replay_last_endpoint)]


async def test_emulator_equals_real_vllm_request_for_request(vllm_pair: VLLMPair, request):
    assert tuple(vllm_pair.adapters) == ADAPTERS
    em = await emulator_twin(vllm_pair.adapters)
    try:
        await _differential(_sides(vllm_pair.b, em), lambda msg: say(request, msg))
    finally:
        await em.stop()


async def _differential(sides: list[Side], progress=lambda msg: None) -> None:
    compared = {"requests": 0, "batches": 0, "events": 0, "cached_tokens": 0, "chunked": 0, "adapter_requests": 0,
                "adapter_cached_tokens": 0}
    for seed in range(SCENARIOS):
        ops = scenario(seed)
        progress(f"real-vLLM differential: scenario {seed + 1} of {SCENARIOS} ({len(ops)} operations on both sides)")
        await _settle(sides)
        results, events = await _play(sides, ops, END_MARKER)
        problem = _first_divergence(results, events)
        if problem:
            small = await _shrink(sides, ops)
            pytest.fail(f"seed {seed}: {problem}\nshrunk reproduction ({len(small)} ops):\n{_describe(small)}")
        compared["requests"] += sum(1 for op in ops if not op.get("reset"))
        compared["batches"] += len(events[0])
        compared["events"] += sum(len(x) for x in events[0])
        compared["cached_tokens"] += sum(r[0] for r in results if isinstance(r[0], int))
        compared["chunked"] += sum(1 for op in ops if not op.get("reset") and len(op["prompt"]) > DIFF_BUDGET)
        lora_ops = [(op, r) for op, r in zip(ops, results) if op.get("model", MODEL_NAME) != MODEL_NAME]
        compared["adapter_requests"] += len(lora_ops)
        compared["adapter_cached_tokens"] += sum(r[0] for _, r in lora_ops if isinstance(r[0], int))
    print(f"\ndifferential: {compared} equal on vLLM and the emulator ({SCENARIOS} scenarios)")
    assert compared["chunked"] > 100 and compared["cached_tokens"] > 0
    assert compared["adapter_requests"] > 300 and compared["adapter_cached_tokens"] > 0
