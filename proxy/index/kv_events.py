"""Follow one backend's KV cache from its vLLM KV events, and notice when we stopped following it.

A `KVEventSubscriber` reads the backend's ZMQ PUB stream ([topic, seq, msgpack batch]), applies the
events in sequence order to a sink (the proxy's prefix index) and watches for trouble: a sequence gap,
a restarted publisher, an undecodable payload, a dropped connection, or silence while the backend is
busy. On trouble it
tells the sink (`desync`) so routing falls back to the approximate index for that backend, then
resyncs (replay from its last good batch when a replay endpoint is offered, else clear and rebuild
from new events) and reports `resynced`. It knows nothing about routing policies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvblocks.kv_events import (
    MEDIUM_GPU,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    int_hash,
    parse_replay_reply,
    replay_request,
)

log = logging.getLogger("kvroute.proxy.kv_events")
# Transports a subscriber can connect over (pyzmq raises "Protocol not supported" on others at connect time).
ZMQ_TRANSPORTS = ("tcp", "ipc", "inproc")

# Why a backend's exact view was lost (label values of kvroute_kv_events_desync_total).
GAP = "gap"
RESTART = "restart"
UNDECODABLE = "undecodable"
SILENCE = "silence"
DISCONNECT = "disconnect"
DESYNC_REASONS = (GAP, RESTART, UNDECODABLE, SILENCE, DISCONNECT)

_CONNECTED = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED
_DISCONNECTED = zmq.EVENT_DISCONNECTED


class KVEventSink(Protocol):
    """Receives one backend's cache changes, in order; hashes are the int form of block digests."""

    def stored(self, backend: str, hashes: list[int], parent: int | None, token_ids: list[int], block_size: int) -> None:
        """`backend` cached these blocks (chained after `parent`, None at the prompt's start)."""

    def removed(self, backend: str, hashes: list[int]) -> None:
        """`backend` evicted these blocks."""

    def clear(self, backend: str) -> None:
        """`backend` dropped its whole cache."""

    def desync(self, backend: str, reason: str) -> None:
        """Events were lost (gap, restart, corruption, silence): what is known of `backend` is no longer exact."""

    def resynced(self, backend: str) -> None:
        """A replay or fresh start made `backend`'s events complete again from here on."""


@dataclass(frozen=True)
class KVEventSource:
    """Where a backend publishes: vLLM's `--kv-events-config` endpoint/topic/replay_endpoint, as reachable
    from the proxy (e.g. `tcp://10.0.0.5:5557` for a server started with `tcp://*:5557`)."""

    endpoint: str
    topic: str = ""
    replay_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value.partition("://")[0] not in ZMQ_TRANSPORTS
                                      or not value.partition("://")[2]):
                raise ValueError(f"kv_events {name} {value!r} must be a ZMQ address such as tcp://127.0.0.1:5557 "
                                 f"({', '.join(t + '://' for t in ZMQ_TRANSPORTS)})")
        if not isinstance(self.topic, str):
            raise ValueError("kv_events topic must be a string")

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> KVEventSource:
        """`ENDPOINT[?topic=T&replay=R]` (the `--kv-events` flag), or `{"endpoint", "topic", "replay_endpoint"}`
        from a backends file."""
        if isinstance(value, str):
            endpoint, _, query = value.strip().partition("?")
            params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
            unknown = sorted(set(params) - {"topic", "replay"})
            if unknown:
                raise ValueError(f"unknown --kv-events option(s) {', '.join(unknown)}; use ?topic=T&replay=tcp://host:port")
            return cls(endpoint=endpoint, topic=params.get("topic", ""), replay_endpoint=params.get("replay") or None)
        if not isinstance(value, dict) or "endpoint" not in value:
            raise ValueError('kv_events must be an endpoint string or {"endpoint": ..., "topic": ..., "replay_endpoint": ...}')
        unknown = sorted(set(value) - {"endpoint", "topic", "replay_endpoint"})
        if unknown:
            raise ValueError(f"unknown kv_events key(s): {', '.join(unknown)}")
        return cls(endpoint=value["endpoint"], topic=value.get("topic") or "", replay_endpoint=value.get("replay_endpoint"))


@dataclass
class SubscriberStats:
    """Counters a caller can export; `synced` is True while the backend's exact view is trustworthy."""

    synced: bool = False
    messages: int = 0
    batches_applied: int = 0
    events_applied: int = 0
    replays: int = 0
    busy_checks: int = 0
    last_seq: int | None = None
    desyncs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DESYNC_REASONS, 0))


class KVEventSubscriber:
    """One backend's event stream -> sink, with gap/restart/corruption/silence detection and resync."""

    def __init__(
        self,
        backend: str,
        source: KVEventSource,
        sink: KVEventSink,
        *,
        busy: Callable[[], bool] | None = None,
        silence_timeout: float = 15.0,
        replay_timeout: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.backend = backend
        self.source = source
        self.sink = sink
        self.stats = SubscriberStats()
        self._busy = busy
        self._silence_timeout = silence_timeout
        self._replay_timeout = replay_timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._dropped = False
        self._task: asyncio.Task[None] | None = None
        self._applied: int | None = None
        self._last_payload: bytes | None = None
        self._replayed: dict[int, bytes] = {}  # batches applied by the last replay, still queued live
        self._replayed_max = -1
        self._last_heard = 0.0
        self._busy_since: float | None = None
        self._last_probe = 0.0
        self.bound_endpoint: str | None = None  # set when the subscriber binds and publishers connect to it

    @property
    def synced(self) -> bool:
        """Whether every event since the last (re)sync arrived, in order: the backend's view is exact."""
        return self.stats.synced

    @property
    def started(self) -> bool:
        """Whether `start` ran (the receive loop exists)."""
        return self._task is not None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (or bind, for an address with `*`) and follow the stream in a background task."""
        if self._task is not None:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode("utf-8"))
        if "*" in self.source.endpoint:
            sub.bind(self.source.endpoint)
        else:
            sub.connect(self.source.endpoint)
        self._sub = sub
        self._monitor = sub.get_monitor_socket(_CONNECTED | _DISCONNECTED)
        last = sub.getsockopt(zmq.LAST_ENDPOINT)
        self.bound_endpoint = last.decode() if last and "*" in self.source.endpoint else None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self.backend}")

    async def close(self) -> None:
        """Stop receiving and close the sockets; idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        assert self._sub is not None
        try:
            if self.source.replay_endpoint and await self._catch_up():
                self._mark_synced()
            tick_ms = int(1000 * max(0.02, min(0.25, self._silence_timeout / 4)))
            poller = zmq.asyncio.Poller()
            poller.register(self._sub, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            while True:
                try:
                    ready = dict(await poller.poll(tick_ms))
                    if self._monitor in ready:
                        await self._on_connection_event(parse_monitor_message(await self._monitor.recv_multipart()))
                    if self._sub in ready:
                        await self._on_message(await self._sub.recv_multipart())
                    await self._check_silence()
                except (asyncio.CancelledError, zmq.ContextTerminated):
                    raise
                except Exception:
                    log.exception("kv events %s: failed to apply events; rebuilding", self.backend)
                    self._desync(UNDECODABLE)
                    self._reset()
        except zmq.ContextTerminated:
            return

    # ---- connection --------------------------------------------------------------------------------

    async def _on_connection_event(self, event: dict[str, Any]) -> None:
        """A dropped publisher desyncs at once; on reconnection a replay tells a blip from a restart."""
        if event["event"] & _DISCONNECTED:
            log.warning("kv events %s: publisher connection dropped", self.backend)
            self._dropped = True
            self._desync(DISCONNECT)
        elif event["event"] & _CONNECTED and self._dropped:
            self._dropped = False
            log.info("kv events %s: publisher reconnected", self.backend)
            if self.source.replay_endpoint and await self._catch_up():
                self._mark_synced()

    # ---- live stream --------------------------------------------------------------------------------

    async def receive(self, frames: list[bytes]) -> None:
        """Apply one [topic, seq, payload] message as if read from the socket (an in-process publisher:
        `loadgen simulate` hands each engine step's batch here instead of over ZMQ)."""
        await self._on_message(frames)

    async def _on_message(self, frames: list[bytes]) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        self.stats.messages += 1
        if len(frames) != 3 or len(frames[1]) != 8:
            log.warning("kv events %s: message with %d frames is not vLLM's [topic, seq, payload]", self.backend, len(frames))
            self._desync(UNDECODABLE)
            self._reset()
            return
        _, seq_frame, payload = frames
        seq = int.from_bytes(seq_frame, "big")
        if self._applied is not None and seq <= self._applied:
            if self._replayed.get(seq) == payload:
                return  # already applied through a replay
            log.warning("kv events %s: sequence went back from %d to %d: publisher restarted", self.backend, self._applied, seq)
            self._desync(RESTART)
            self._reset()
        if self._replayed and seq > self._replayed_max:
            self._replayed.clear()
        expected = 0 if self._applied is None else self._applied + 1
        if seq != expected:
            missed = GAP if self._applied is not None else None
            if missed:
                log.warning("kv events %s: sequence gap, expected %d got %d", self.backend, expected, seq)
            if self.source.replay_endpoint and await self._catch_up(missed):
                if self._applied is not None and seq <= self._applied:
                    self._mark_synced()
                    return
            if missed:
                self._desync(missed)
            if self._applied is not None and seq != self._applied + 1:
                self._reset()  # history lost: rebuild from what arrives from now on
        if self._apply(seq, payload):
            self._mark_synced()

    def _apply(self, seq: int, payload: bytes) -> bool:
        """Decode the whole batch first so a bad payload changes nothing, then apply it in order."""
        try:
            batch = decode_batch(payload)
        except ValueError as e:
            log.warning("kv events %s: batch %d undecodable: %s", self.backend, seq, e)
            self._desync(UNDECODABLE)
            self._reset()
            self._applied, self._last_payload = seq, payload
            return False
        self._apply_batch(batch)
        self._applied = seq
        self._last_payload = payload
        self.stats.last_seq = seq
        self.stats.batches_applied += 1
        return True

    def _apply_batch(self, batch: EventBatch) -> None:
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                if ev.medium not in (None, MEDIUM_GPU):
                    continue
                parent = int_hash(ev.parent_block_hash) if ev.parent_block_hash is not None else None
                self.sink.stored(self.backend, [int_hash(h) for h in ev.block_hashes], parent, ev.token_ids, ev.block_size)
            elif isinstance(ev, BlockRemoved):
                if ev.medium not in (None, MEDIUM_GPU):
                    continue
                self.sink.removed(self.backend, [int_hash(h) for h in ev.block_hashes])
            elif isinstance(ev, AllBlocksCleared):
                self.sink.clear(self.backend)
            self.stats.events_applied += 1

    # ---- state transitions --------------------------------------------------------------------------

    def _desync(self, reason: str) -> None:
        """Count and report once per episode: the sink falls back to approximate until `resynced`."""
        if not self.stats.synced:
            return
        self.stats.synced = False
        self.stats.desyncs[reason] = self.stats.desyncs.get(reason, 0) + 1
        log.warning("kv events %s: exact view lost (%s); falling back to approximate", self.backend, reason)
        self.sink.desync(self.backend, reason)

    def _mark_synced(self) -> None:
        if self.stats.synced:
            return
        self.stats.synced = True
        self._busy_since = None
        if self._applied is None:
            log.info("kv events %s: exact view established before the first event batch (empty cache)", self.backend)
        else:
            log.info("kv events %s: exact view (re)established at seq %d", self.backend, self._applied)
        self.sink.resynced(self.backend)

    def _reset(self) -> None:
        """Forget the backend's exact state: what we hold can no longer be trusted."""
        self.sink.clear(self.backend)
        self._applied = None
        self._last_payload = None
        self._replayed.clear()

    # ---- silence ------------------------------------------------------------------------------------

    async def _check_silence(self) -> None:
        if self._busy is None:
            return
        now = asyncio.get_running_loop().time()
        if not self.stats.synced:
            if self.source.replay_endpoint and now - self._last_probe >= self._silence_timeout:
                self._last_probe = now
                if await self._catch_up():
                    self._last_heard = asyncio.get_running_loop().time()
                    self._mark_synced()
            return
        self.stats.busy_checks += 1
        if not self._busy():
            self._busy_since = None
            return
        if self._busy_since is None:
            self._busy_since = now
        if now - max(self._last_heard, self._busy_since) < self._silence_timeout:
            return
        if self.source.replay_endpoint:
            self._last_probe = now
            before = self._applied
            if await self._catch_up():
                self._last_heard = asyncio.get_running_loop().time()
                if self._applied != before:
                    self._desync(SILENCE)  # the publisher was alive but its batches never reached us
                    self._mark_synced()
                return
        log.warning("kv events %s: busy but silent for %.1fs", self.backend, self._silence_timeout)
        self._desync(SILENCE)

    # ---- replay -------------------------------------------------------------------------------------

    async def _catch_up(self, missed: str | None = None) -> bool:
        """Apply every batch after our last one from the publisher's replay buffer.

        We ask from our last applied seq (not +1) so that its payload proves the publisher is the one
        we followed (then a known loss is reported as `missed`); otherwise it restarted (or its buffer
        rolled past us) and we rebuild from seq 0. Returns False when the replay socket does not answer.
        """
        items = await self._fetch_replay(self._applied if self._applied is not None else 0)
        if items is None:
            return False
        if self._applied is not None:
            if items and items[0] == (self._applied, self._last_payload):
                items = items[1:]
                if missed:
                    self._desync(missed)
            else:
                log.warning("kv events %s: publisher no longer has batch %d: restarted", self.backend, self._applied)
                self._desync(RESTART)
                self._reset()
                if not items or items[0][0] != 0:
                    items = await self._fetch_replay(0)
                    if items is None:
                        return False
        if self._applied is None and items and items[0][0] != 0:
            log.warning("kv events %s: replay starts at %d: older history is gone", self.backend, items[0][0])
        for seq, payload in items:
            if self._applied is not None and seq <= self._applied:
                continue
            self._apply(seq, payload)
            self._replayed[seq] = payload
            self._replayed_max = seq
        return True

    async def _fetch_replay(self, start_seq: int) -> list[tuple[int, bytes]] | None:
        """vLLM's replay protocol over a DEALER (framing in kvblocks.kv_events): every batch from `start_seq`."""
        assert self.source.replay_endpoint is not None
        self.stats.replays += 1
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.source.replay_endpoint)
            await sock.send_multipart(replay_request(start_seq))
            items: list[tuple[int, bytes]] = []
            while True:
                if not await sock.poll(int(self._replay_timeout * 1000), zmq.POLLIN):
                    log.warning("kv events %s: replay from %d timed out", self.backend, start_seq)
                    return None
                try:
                    seq, payload = parse_replay_reply(await sock.recv_multipart())
                except ValueError as e:
                    log.warning("kv events %s: %s", self.backend, e)
                    return None
                if seq == REPLAY_END_SEQ:
                    return items
                items.append((seq, payload))
        finally:
            sock.close(linger=0)


class KVEventsFollower:
    """The proxy's side of KV events: one subscriber per event-publishing backend, feeding the prefix index.

    It is the subscribers' sink. For each followed backend it keeps the exact block set the events
    describe (in LRU order) and writes every change through to the shared `PrefixIndex`. While a
    backend is in sync its part of the index is exact (routing must not add guesses for it); after a
    desync routing guesses again (`is_exact` is False) and on resync the index is re-seeded from the
    exact set, dropping the guesses. Once requests finish, index state depends only on events, so
    replicas agree.

    The one addition to the events: the prompt blocks of requests this proxy routed to an exact
    backend count as held while those requests are in flight (`routed`/`finished`). The backend only
    reports blocks when it schedules the request, so without this a burst on one prefix would be
    spread before the first BlockStored arrives; unlike approximate guesses these entries end with
    the request and never displace event-reported blocks. A lazily read prompt (`prompt_walk.py`)
    also leaves its untokenized rest as a pending tail, as in approximate mode: without it a second
    request for a new document, arriving before the first's BlockStored, matched only the first's
    one hashed block and was sent elsewhere to prefill the document again
    (`benchmarks/kv_hit_rate.py`).
    """

    def __init__(self, index: Any, silence_timeout: float = 10.0, replay_timeout: float = 2.0) -> None:
        self.index = index
        self.silence_timeout = silence_timeout
        self.replay_timeout = replay_timeout
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self._blocks: dict[str, dict[int, None]] = {}  # insertion-ordered: least recently stored first
        self._exact: set[str] = set()  # in sync with the backend's stream
        self._distrusted: set[str] = set()  # in sync, but its answers say the view is wrong (index/exact_audit.py)
        self._pending: dict[str, dict[int, int]] = {}  # backend -> block hash -> in-flight requests
        self._inflight: dict[int, tuple[str, list[int], Any]] = {}  # request id -> (backend, hashes, PendingTail or None)
        self._running = False
        self._closing: set[asyncio.Task[None]] = set()

    # ---- which backends ---------------------------------------------------------------------------

    def follow(self, backend: str, source: KVEventSource, busy: Callable[[], bool] | None = None) -> KVEventSubscriber:
        """Subscribe to `backend`'s events (started now if the follower runs, else by `start`)."""
        if backend in self.subscribers:
            raise ValueError(f"backend {backend} is already followed")
        sub = KVEventSubscriber(
            backend, source, self, busy=busy, silence_timeout=self.silence_timeout, replay_timeout=self.replay_timeout
        )
        self.subscribers[backend] = sub
        self._blocks[backend] = {}
        self._pending[backend] = {}
        if self._running:
            sub.start()
        return sub

    def unfollow(self, backend: str) -> None:
        """Stop following a removed backend; its late events are ignored while the subscriber closes."""
        sub = self.subscribers.pop(backend, None)
        self._blocks.pop(backend, None)
        self._pending.pop(backend, None)
        self._exact.discard(backend)
        self._distrusted.discard(backend)
        if sub is not None and sub.started:
            task = asyncio.get_running_loop().create_task(sub.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def start(self) -> None:
        """Start every subscriber on the running loop."""
        self._running = True
        for sub in self.subscribers.values():
            sub.start()

    async def close(self) -> None:
        """Close every subscriber; the index keeps what it knows, as approximate."""
        self._running = False
        for sub in list(self.subscribers.values()):
            await sub.close()
        if self._closing:
            await asyncio.gather(*self._closing)

    # ---- what routing asks ------------------------------------------------------------------------

    def is_exact(self, backend: str) -> bool:
        """Whether `backend`'s part of the index follows its events now (followed, in sync, not distrusted by
        the exact-view audit)."""
        return backend in self._exact and backend not in self._distrusted

    def in_sync(self, backend: str) -> bool:
        """Following the backend's stream without a known loss (trusted or not)."""
        return backend in self._exact

    def batches_applied(self, backend: str) -> int:
        sub = self.subscribers.get(backend)
        return sub.stats.batches_applied if sub is not None else 0

    def exact_prefix(self, backend: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the events (plus this proxy's in-flight prompts there) say it holds."""
        blocks = self._blocks.get(backend, {})
        pending = self._pending.get(backend, {})
        n = 0
        for h in hashes:
            if h not in blocks and h not in pending:
                break
            n += 1
        return n

    def distrust(self, backend: str) -> None:
        """Route `backend` on the approximate index although its stream looks in sync."""
        self._distrusted.add(backend)

    def trust(self, backend: str) -> None:
        """Back to the exact view: re-seed the index from the events, dropping the guesses made meanwhile."""
        if backend not in self._distrusted:
            return
        self._distrusted.discard(backend)
        if backend in self._exact:
            self.resynced(backend)

    def followed(self, backend: str) -> bool:
        """Whether `backend` has a subscriber (in sync or not)."""
        return backend in self.subscribers

    def mode(self, backend: str) -> str:
        """"exact" or "approximate", as the admin API and metrics report it."""
        return "exact" if self.is_exact(backend) else "approximate"

    def blocks(self, backend: str) -> set[int]:
        """The backend's cached blocks as its events describe them."""
        return set(self._blocks.get(backend, ()))

    def forget_all(self) -> None:
        """An admin reset cleared the index and the backends' caches: drop the exact sets too."""
        for blocks in self._blocks.values():
            blocks.clear()

    # ---- requests in flight ------------------------------------------------------------------------

    def routed(self, request_id: int, backend: str, hashes: Sequence[int], tail: Any = None, tail_blocks: int = 0) -> None:
        """A request was routed to an exact backend: its prompt blocks count as held until `finished`.

        `tail` (estimated at `tail_blocks`) is the prompt's unread rest after `hashes[-1]`; a later
        prompt reaching that block resolves it into more held blocks (`PrefixIndex.hold_tail`)."""
        pending = self._pending.get(backend)
        if pending is None or not self.is_exact(backend):
            return
        held = list(hashes)
        p = None
        if tail is not None and held:
            p = self.index.hold_tail(backend, held[-1], tail, tail_blocks, lambda more: self._hold(request_id, more))
        self._inflight[request_id] = (backend, held, p)
        self._hold(request_id, held, count=False)

    def _hold(self, request_id: int, hashes: Sequence[int], count: bool = True) -> None:
        """Count `hashes` as held by the in-flight request (`count`: also add them to its list)."""
        entry = self._inflight.get(request_id)
        if entry is None:
            return
        backend, held, _ = entry
        pending = self._pending.get(backend)
        if pending is None:
            return
        if count:
            held += hashes
        blocks = self._blocks[backend]
        new = []
        for h in hashes:
            n = pending.get(h, 0)
            pending[h] = n + 1
            if n == 0 and h not in blocks:
                new.append(h)
        if new:
            self.index.stored(backend, new)

    def finished(self, request_id: int) -> None:
        """Request `request_id` (routed to an exact backend) ended: the blocks assumed held for it until their
        store events arrived stop being assumed (what the events stored stays). Unknown ids are ignored."""
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        backend, hashes, tail = entry
        pending = self._pending.get(backend)
        if pending is None:
            return
        if tail is not None:
            self.index.settle_tail(tail)
        blocks = self._blocks[backend]
        gone = []
        for h in hashes:
            n = pending.get(h, 0) - 1
            if n > 0:
                pending[h] = n
            else:
                pending.pop(h, None)
                if h not in blocks:
                    gone.append(h)
        if gone and self.is_exact(backend):
            self.index.removed(backend, gone)

    # ---- KVEventSink ------------------------------------------------------------------------------

    def stored(self, backend: str, hashes: list[int], parent: int | None, token_ids: list[int], block_size: int) -> None:
        """KVEventSink: add the blocks to `backend`'s exact set and the index."""
        blocks = self._blocks.get(backend)
        if blocks is None:
            return
        for h in hashes:
            blocks.pop(h, None)
            blocks[h] = None
        self.index.stored(backend, hashes)

    def removed(self, backend: str, hashes: list[int]) -> None:
        """KVEventSink: drop the blocks from `backend`'s exact set and the index."""
        blocks = self._blocks.get(backend)
        if blocks is None:
            return
        for h in hashes:
            blocks.pop(h, None)
        pending = self._pending[backend]
        self.index.removed(backend, [h for h in hashes if h not in pending])

    def clear(self, backend: str) -> None:
        """KVEventSink: `backend`'s cache is empty."""
        blocks = self._blocks.get(backend)
        if blocks is None:
            return
        blocks.clear()
        self.index.clear(backend)
        self.index.stored(backend, list(self._pending[backend]))

    def desync(self, backend: str, reason: str) -> None:
        """KVEventSink: `backend` falls back to approximate (routing feeds its part again)."""
        self._exact.discard(backend)  # counted in the subscriber's stats (kvroute_kv_events_desync_total)

    def resynced(self, backend: str) -> None:
        """KVEventSink: `backend`'s part of the index is rebuilt from its exact set; exact again."""
        blocks = self._blocks.get(backend)
        if blocks is None:
            return
        self.index.clear(backend)
        self.index.stored(backend, list(blocks))
        self.index.stored(backend, [h for h in self._pending[backend] if h not in blocks])
        self._exact.add(backend)
