"""One replica's side of the stream: PUB of its fact batches plus vLLM's ROUTER replay socket.

As vLLM's `ZmqEventPublisher` (and the emulator's): every batch gets the next sequence number and
a place in a ring buffer; a peer that saw a gap asks the ROUTER for every batch from a seq on.
Unlike KV events, a replica's state is more than its recent batches, so a request from seq 0 (a
peer that joined late or lost us) or from before the ring's start (one that fell far behind) is
answered with one snapshot batch tagged with the last published seq, from which the live stream
continues.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

import zmq
import zmq.asyncio

from kvblocks.kv_events import encode_seq, parse_replay_request, replay_end, replay_reply

from . import facts
from .aggregate import METRICS_REQUEST

log = logging.getLogger("kvroute.proxy.replicas")
RING_BATCHES = 4096
SNDHWM = 100_000


def replay_bind(requested: str, bound: str) -> str:
    """Where the ROUTER binds next to a PUB endpoint: the next port when the PUB's was fixed (a firewall
    or NetworkPolicy can name both), an ephemeral one when it was, or `<path>.replay` for ipc://."""
    scheme, _, rest = bound.partition("://")
    if scheme != "tcp":
        return f"{bound}.replay"
    host, _, port = rest.rpartition(":")
    fixed = requested.rpartition(":")[2]
    return f"tcp://{host}:{int(port) + 1}" if fixed.isdigit() and int(fixed) else f"tcp://{host}:*"


class FactPublisher:
    """PUB `[topic, seq, payload]` per batch (never blocks: above the high-water mark ZMQ drops and the
    peers see a gap) and answers replay requests from the ring, or with `snapshot()`."""

    def __init__(self, bind: str, epoch: str, snapshot: Callable[[], bytes], ring: int | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self._ctx = zmq.Context.instance()
        self._actx = zmq.asyncio.Context.instance()
        self._snapshot = snapshot
        self._metrics = metrics  # this replica's own /metrics, for a worker answering for all (aggregate.py)
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=ring or RING_BATCHES)
        self.next_seq = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self._pub.bind(bind)
        self.endpoint = self._pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._router = self._actx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(replay_bind(bind, self.endpoint))
        self.replay_endpoint = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._topic = facts.topic(epoch, self.replay_endpoint)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.replays_served = 0
        self.snapshots_served = 0
        # When set (tests), the batch with this seq is buffered but not sent: a message lost on the wire.
        self.drop_seq: int | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve_replay(), name="replica-replay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._pub.close(linger=0)
        self._router.close(linger=0)

    def publish(self, payload: bytes) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._ring.append((seq, payload))
        if seq == self.drop_seq:
            return seq
        try:
            self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        return seq

    def backlog(self, start_seq: int) -> list[tuple[int, bytes]]:
        """Every buffered batch from `start_seq`, or one snapshot when the ring no longer reaches back to it
        or the peer starts from nothing (seq 0): replaying old history would make old prompts look recent."""
        ring = self._ring
        if ring and 0 < start_seq and ring[0][0] <= start_seq <= self.next_seq:
            return [(s, p) for s, p in ring if s >= start_seq]
        payload = self._snapshot()  # flushes pending facts first, so it covers every seq published so far
        self.snapshots_served += 1
        return [(self.next_seq - 1, payload)]

    async def _serve_replay(self) -> None:
        sock = self._router
        while True:
            frames = await sock.recv_multipart()
            if len(frames) == 3 and frames[1:] == [b"", METRICS_REQUEST]:
                text = self._metrics() if self._metrics is not None else b""
                await sock.send_multipart((frames[0], b"", METRICS_REQUEST, text))
                continue
            start = parse_replay_request(frames)
            if start is None:
                log.warning("replica replay: invalid request with %d frames", len(frames))
                continue
            self.replays_served += 1
            client = frames[0]
            try:
                for seq, payload in self.backlog(start):
                    await sock.send_multipart((client, *replay_reply(self._topic, seq, payload)))
                await sock.send_multipart((client, *replay_end()))
            except zmq.ZMQError as e:
                log.warning("replica replay to a peer failed: %s", e)
