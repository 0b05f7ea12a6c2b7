"""Our block hashes and our KV-event subscriber against vLLM's own code (run in the vLLM venv).

No server needed: vLLM's `Request` + `get_request_block_hasher` compute the hashes the scheduler
would, and vLLM's `ZmqEventPublisher` publishes and replays as a server's engine does.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from kvblocks import BlockHasher, LoraKey, extra_keys, salt_extra_keys
from proxy.index.kv_events import KVEventSource, KVEventSubscriber

from ..kv_events.helpers import RecordingSink, eventually
from .vllm_server import free_port

# Session set-up (venv build, two vLLM start-ups) counts against the first test: give it room.
pytestmark = pytest.mark.timeout(1800)

SIDE = Path(__file__).parent / "vllm_side"


@pytest.fixture(scope="module")
def vpy(vllm_toolchain) -> Path:
    return vllm_toolchain.python


def _vllm_hashes(vpy: Path, cases: list[dict], hash_seed: str | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    r = subprocess.run([str(vpy), str(SIDE / "block_hashes.py")], input=json.dumps(cases), capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _ours(case: dict, hash_seed: str | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    if hash_seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", hash_seed)
    h = BlockHasher(case["block_size"], case["algo"])
    if case.get("lora"):
        keys = extra_keys(LoraKey(*case["lora"]), case["cache_salt"])
        return [d.hex() for d in h.hashes(case["tokens"], keys=keys)]
    return [d.hex() for d in h.hashes(case["tokens"], extra_keys_block0=salt_extra_keys(case["cache_salt"]))]


def _held_after(n: int) -> set[int]:
    """What publisher.py's first `n` batches leave cached: block 1000+i, minus 1000+i-1 when i % 3 == 2."""
    held: set[int] = set()
    for i in range(n):
        held.add(1000 + i)
        if i % 3 == 2:
            held.discard(1000 + i - 1)
    return held


@pytest.mark.parametrize("hash_seed", [None, "", "1234"])
def test_block_hashes_equal_vllms_for_salted_and_plain_prompts(vpy, hash_seed, monkeypatch):
    """Random prompts, block sizes, both algorithms, with and without cache_salt, under three seeds
    (unset, the empty string vLLM treats as a seed of its own, and a value)."""
    rng = random.Random(7)
    cases = []
    for i in range(40):
        bs = rng.choice([1, 16, 32, 64])
        cases.append({
            "tokens": [rng.randrange(100_000) for _ in range(rng.randrange(0, 6 * bs))],
            "block_size": bs,
            "algo": rng.choice(["sha256", "sha256_cbor"]),
            "cache_salt": rng.choice([None, "tenant-a", f"salt-{i}", "ünïcode"]),
        })
    theirs = _vllm_hashes(vpy, cases, hash_seed)
    salted_blocks = 0
    for case, want in zip(cases, theirs):
        assert _ours(case, hash_seed, monkeypatch) == want["hashes"], case
        if case["cache_salt"] and want["hashes"]:
            salted_blocks += 1
            # what vLLM publishes in events for the same blocks: untagged salt on block 0 only
            assert want["event_extra_keys"][0] == [case["cache_salt"]]
            assert all(k is None for k in want["event_extra_keys"][1:])
    assert salted_blocks >= 5


def test_lora_block_hashes_and_event_keys_equal_vllms(vpy, monkeypatch):
    """An adapter request's blocks carry ("lora", name, path) on every block (vLLM's
    `_gen_lora_extra_hash_keys`), the salt after it on block 0; events carry them untagged. The same
    text under the base model, another adapter, or the same name at another path hashes apart."""
    rng = random.Random(11)
    tokens = [rng.randrange(100_000) for _ in range(80)]
    cases = [
        {"tokens": tokens, "block_size": 16, "algo": "sha256", "cache_salt": None, "lora": None},
        {"tokens": tokens, "block_size": 16, "algo": "sha256", "cache_salt": None, "lora": ["sql", "/a/sql"]},
        {"tokens": tokens, "block_size": 16, "algo": "sha256", "cache_salt": None, "lora": ["sql", "/b/sql"]},
        {"tokens": tokens, "block_size": 16, "algo": "sha256", "cache_salt": None, "lora": ["chat", "/a/sql"]},
    ]
    for i in range(16):
        bs = rng.choice([1, 16, 32])
        cases.append({
            "tokens": [rng.randrange(100_000) for _ in range(rng.randrange(0, 5 * bs))],
            "block_size": bs, "algo": rng.choice(["sha256", "sha256_cbor"]),
            "cache_salt": rng.choice([None, "tenant-a", "ünïcode"]),
            "lora": [rng.choice(["sql", "ädapter-2"]), rng.choice(["/tmp/x", "/ü/y"])],
        })
    theirs = _vllm_hashes(vpy, cases, None)
    for case, want in zip(cases, theirs):
        assert _ours(case, None, monkeypatch) == want["hashes"], case
        if case["lora"] and want["hashes"]:
            keys = extra_keys(LoraKey(*case["lora"]), case["cache_salt"])
            assert want["event_extra_keys"] == [list(keys.event(i)) for i in range(len(want["hashes"]))]
    base, a_sql, b_sql, a_chat = (set(w["hashes"]) for w in theirs[:4])
    assert len(base) == 5 and not (base & a_sql) and not (a_sql & b_sql) and not (a_sql & a_chat)


async def test_subscriber_replays_and_follows_vllms_own_publisher(vpy):
    """vLLM's ZmqEventPublisher publishes 5 batches before we subscribe (we must replay them through
    its ROUTER, in its framing) and 4 after (live); the sink must end with exactly what it holds."""
    # vLLM binds its PUB only for a wildcard address (`tcp://*:P`); `tcp://127.0.0.1:P` would make it connect
    port = free_port()
    pub_ep, replay_ep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        str(vpy), str(SIDE / "publisher.py"), f"tcp://*:{port}", replay_ep, "kv-events",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )

    async def say(cmd: str) -> str:
        proc.stdin.write(cmd.encode() + b"\n")
        await proc.stdin.drain()
        return (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()

    sub = None
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip() == "ready"
        assert await say("publish 5") == "done 4"
        sink = RecordingSink()
        sub = KVEventSubscriber("vllm", KVEventSource(pub_ep, "kv-events", replay_ep), sink, replay_timeout=5.0)
        sub.start()
        await eventually(lambda: sub.synced and sub.stats.last_seq == 4, timeout=20, what="replay of seq 0..4")
        assert sub.stats.replays >= 1
        assert sink.held("vllm") == _held_after(5)
        # live: publish one batch at a time until one arrives over PUB (ZMQ's slow joiner), then more
        last = 4
        for _ in range(50):
            last = int((await say("publish 1")).split()[1])
            if sub.stats.messages:
                break
            await asyncio.sleep(0.05)  # a connection being set up; the loop is bounded
        assert sub.stats.messages, "no live batch reached the subscriber"
        last = int((await say("publish 3")).split()[1])
        await eventually(lambda: sub.stats.last_seq == last, timeout=20, what=f"live batches up to {last}")
        assert sub.synced and sink.held("vllm") == _held_after(last + 1)
        assert not any(sub.stats.desyncs.values()), sub.stats.desyncs
    finally:
        if proc.returncode is None:
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
        if sub is not None:
            await sub.close()
