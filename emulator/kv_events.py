"""KV-event publishing exactly as vLLM 0.33 does it, so any vLLM-aware router can follow the emulator.

`KVEventsConfig` parses the same JSON as `vllm serve --kv-events-config`; `ZmqEventPublisher` sends one
message per engine step on a ZMQ PUB socket and serves missed batches from a ROUTER replay socket.
"""
from __future__ import annotations

import json
import os
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import zmq

from kvblocks.kv_events import (
    EventBatch,
    KVEvent,
    encode_batch,
    encode_seq,
    parse_replay_request,
    replay_end,
    replay_reply,
)

log = logging.getLogger("kvroute.emulator.kv_events")

PUBLISHERS = ("null", "zmq")


@dataclass
class KVEventsConfig:
    """vLLM's `--kv-events-config` (vllm/config/kv_events.py): same keys, same defaults."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"
        if self.publisher not in PUBLISHERS:
            raise ValueError(f"unknown KV event publisher {self.publisher!r}; choose one of {', '.join(PUBLISHERS)}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"kv-events-config {name} must be a non-negative integer")
        # A transport ZMQ does not know fails only when the publisher binds (a traceback at start-up): check it here.
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is None and name == "replay_endpoint":
                continue
            if not isinstance(value, str) or value.partition("://")[0] not in ("tcp", "ipc", "inproc") \
                    or not value.partition("://")[2]:
                raise ValueError(f"kv_events_config {name} {value!r} must be a ZMQ address such as tcp://*:5557 "
                                 "(tcp://, ipc:// or inproc://)")

    @property
    def active(self) -> bool:
        """Events are published only when enabled and the publisher is not "null" (vLLM's factory rule)."""
        return self.enable_kv_cache_events and self.publisher != "null"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVEventsConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown kv-events-config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"kv-events-config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("kv-events-config must be a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offset_endpoint(endpoint: str | None, data_parallel_rank: int) -> str | None:
    """Data-parallel rank r publishes on port + r (tcp) or `<name>_dp<r>` (inproc/ipc), as vLLM does."""
    if not endpoint or data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith(("inproc://", "ipc://")):
        return f"{endpoint}_dp{data_parallel_rank}"
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if port.isdigit() and int(port) != 0:
            return f"{base}:{int(port) + data_parallel_rank}"
        return endpoint
    raise ValueError(f"invalid KV-event endpoint {endpoint!r}: must be tcp://, ipc:// or inproc://")


def binds(endpoint: str) -> bool:
    """vLLM's rule: bind when the address has `*` or `::` or is ipc/inproc, else connect.

    A tcp port of 0 (OS-assigned, only meaningful for bind) also binds; tests use it.
    """
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
        or (endpoint.startswith("tcp://") and endpoint.rpartition(":")[2] == "0")
    )


class EventPublisher(Protocol):
    """What the engine calls once per step."""

    def publish(self, events: Sequence[KVEvent]) -> int | None: ...

    def close(self) -> None: ...


class NullEventPublisher:
    """Publisher "null" or events disabled: drops everything."""

    last_endpoint: str | None = None
    replay_last_endpoint: str | None = None

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        return None

    def close(self) -> None:
        return None


class ZmqEventPublisher:
    """ZMQ PUB of [topic, seq, msgpack batch] per engine step, plus vLLM's optional ROUTER replay.

    `publish` sends inline (a PUB send never blocks: above the high-water mark ZMQ drops, which a
    subscriber sees as a sequence gap). The replay socket is served from its own thread.
    """

    POLL_MS = 50

    def __init__(
        self, config: KVEventsConfig, data_parallel_rank: int = 0, context: zmq.Context | None = None
    ) -> None:
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        self._ctx = context or zmq.Context.instance()
        self._topic = config.topic.encode("utf-8")
        self._next_seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        endpoint = offset_endpoint(config.endpoint, data_parallel_rank)
        assert endpoint is not None
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if binds(endpoint):
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.last_endpoint: str = self._endpoint_of(self._pub, endpoint)
        self._replay: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self.replay_last_endpoint: str | None = None
        replay = offset_endpoint(config.replay_endpoint, data_parallel_rank)
        if replay:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay)
            self.replay_last_endpoint = self._endpoint_of(self._replay, replay)
            self._thread = threading.Thread(target=self._serve_replay, name="kv-events-replay", daemon=True)
            self._thread.start()
        log.info("kv events: publishing on %s (replay %s, topic %r)", self.last_endpoint, self.replay_last_endpoint, config.topic)

    @staticmethod
    def _endpoint_of(sock: zmq.Socket, requested: str) -> str:
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if last else requested

    @property
    def next_seq(self) -> int:
        """The sequence number the next published batch will carry (0 for a fresh publisher)."""
        return self._next_seq

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        """Send one engine step's events as one batch; returns its sequence number (None when empty)."""
        if not events:
            return None
        if self._closed.is_set():
            raise RuntimeError("KV-event publisher is closed")
        payload = encode_batch(EventBatch(ts=time.time(), events=list(events), data_parallel_rank=self.data_parallel_rank))
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._buffer.append((seq, payload))
            try:
                self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("kv events: PUB queue full, batch %d dropped (subscribers can replay it)", seq)
        return seq

    def _serve_replay(self) -> None:
        assert self._replay is not None
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        while not self._closed.is_set():
            if not dict(poller.poll(self.POLL_MS)):
                continue
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            start_seq = parse_replay_request(frames)
            if start_seq is None:
                log.warning("kv events: invalid replay request with %d frames", len(frames))
                continue
            client = frames[0]
            with self._lock:
                backlog = [(s, p) for s, p in self._buffer if s >= start_seq]
            try:
                for seq, payload in backlog:
                    self._replay.send_multipart((client, *replay_reply(self._topic, seq, payload)))
                self._replay.send_multipart((client, *replay_end()))
            except zmq.ZMQError as e:
                log.warning("kv events: replay to a client failed: %s", e)

    def close(self) -> None:
        """Stop the replay thread and close both sockets (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)


def make_publisher(
    config: KVEventsConfig | dict[str, Any] | str | None,
    data_parallel_rank: int = 0,
    context: zmq.Context | None = None,
) -> ZmqEventPublisher | NullEventPublisher:
    """vLLM's EventPublisherFactory: a real publisher only when events are enabled and not "null".

    Takes the parsed config, its dict, or the raw `--kv-events-config` JSON.
    """
    if isinstance(config, str):
        config = KVEventsConfig.from_json(config)
    elif isinstance(config, dict):
        config = KVEventsConfig.from_dict(config)
    if config is None or not config.active:
        return NullEventPublisher()
    return ZmqEventPublisher(config, data_parallel_rank, context)


def replica_kv_events_config(config: dict[str, Any] | None, replica: int) -> dict[str, Any] | None:
    """Replica i of a multi-server emulator publishes on port + i (vLLM's data-parallel rule), so
    `--replicas 4 --kv-events-config '{..."endpoint":"tcp://*:5557"}'` gives 5557..5560."""
    if config is None or replica == 0:
        return config
    out = dict(config)
    for key in ("endpoint", "replay_endpoint"):
        if out.get(key):
            out[key] = offset_endpoint(out[key], replica)
    if "endpoint" not in out:
        out["endpoint"] = offset_endpoint(KVEventsConfig.endpoint, replica)
    return out


def attach_publisher(engine: Any, config: dict[str, Any] | None) -> ZmqEventPublisher | None:
    """Publish the engine's per-step KV events when `--kv-events-config` enables them.

    Hashes travel as ints unless VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0, as in vLLM.
    """
    publisher = make_publisher(config)
    if not isinstance(publisher, ZmqEventPublisher):
        return None
    engine.block_pool.use_int_hashes = os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") != "0"
    engine.set_kv_event_sink(publisher.publish)
    return publisher
