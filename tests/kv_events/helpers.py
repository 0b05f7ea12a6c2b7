"""Shared pieces for KV-event tests: a recording sink, deadline-bounded waiting, a lossy ZMQ relay."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from kvblocks.kv_events import BlockStored


@dataclass
class RecordingSink:
    """Applies events to per-backend block sets and logs every call, in order."""

    blocks: dict[str, dict[int, int | None]] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)

    def stored(self, backend, hashes, parent, token_ids, block_size):
        self.calls.append(("stored", backend, list(hashes), parent, len(token_ids), block_size))
        held = self.blocks.setdefault(backend, {})
        for h in hashes:
            held[h] = parent
            parent = h

    def removed(self, backend, hashes):
        self.calls.append(("removed", backend, list(hashes)))
        for h in hashes:
            self.blocks.setdefault(backend, {}).pop(h, None)

    def clear(self, backend):
        self.calls.append(("clear", backend))
        self.blocks[backend] = {}

    def desync(self, backend, reason):
        self.calls.append(("desync", backend, reason))

    def resynced(self, backend):
        self.calls.append(("resynced", backend))

    def held(self, backend: str) -> set[int]:
        return set(self.blocks.get(backend, {}))

    def kinds(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


async def eventually(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `pred` until it holds; fail after `timeout` seconds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def stored(hashes: list[int | bytes], parent: int | bytes | None = None, block_size: int = 16) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=list(range(block_size * len(hashes))), block_size=block_size)


async def warm_up(publish: Callable[[], object], heard: Callable[[], bool], timeout: float = 5.0) -> int:
    """PUB/SUB slow joiner: publish until the far end confirms receipt; returns how many were sent."""
    deadline = time.monotonic() + timeout
    sent = 0
    while not heard():
        if time.monotonic() > deadline:
            raise AssertionError("subscriber never received a message")
        publish()
        sent += 1
        inner = time.monotonic() + 0.05
        while not heard() and time.monotonic() < inner:
            await asyncio.sleep(0.002)
    return sent


class LossyRelay:
    """A real ZMQ hop between publisher and subscriber that drops or corrupts chosen sequence numbers,
    the way a congested network or an overflowing high-water mark would."""

    def __init__(self, upstream: str) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(upstream)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.drop: set[int] = set()
        self.corrupt: set[int] = set()
        self.forwarded: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            topic, seq_frame, payload = await self.sub.recv_multipart()
            seq = int.from_bytes(seq_frame, "big")
            if seq in self.drop:
                continue
            if seq in self.corrupt:
                payload = b"\xc1 not msgpack"
            self.forwarded.append(seq)
            await self.pub.send_multipart([topic, seq_frame, payload])

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.sub.close(linger=0)
        self.pub.close(linger=0)
