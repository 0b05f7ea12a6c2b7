"""`ReplicaSync`: one replica's routing facts out to its peers, and its peers' facts into its router.

On the request path the router's hooks only queue a fact (a tuple append); the queue is encoded
and published once per `FLUSH_S` on the event loop, so a burst of requests costs one msgpack and
one send. A peer's BEGIN is applied as the router's own `begin` records a prompt (index, exact
in-flight holds, prompt end, the policy's `observe`) and its in-flight record counts as the
backend's load until the peer's END; so N replicas agree on the index and on each backend's load,
up to the propagation delay (about `FLUSH_S` plus the network).

Invariants: a peer's requests in flight are on our backends exactly while that peer is followed
(synced) and has not ended them; when a peer is lost (disconnect, silence, restart) they are
dropped, so load gauges return to zero; our index never loses what it learned from a peer.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from kvblocks import APIError

from ..backends.registry import InFlight, now
from ..index.kv_events import DESYNC_REASONS, ZMQ_TRANSPORTS
from ..routing.policies import RequestContext
from . import aggregate, facts
from .facts import ADD, BEGIN, END, FIRST, REMOVE, RESET, SNAPSHOT, STRATEGY
from .peer import PeerSubscriber
from .publisher import FactPublisher
from .remote_prompt import RemotePrompt, tail_wire

if TYPE_CHECKING:
    from ..routing.router import Router

log = logging.getLogger("kvroute.proxy.replicas")

FLUSH_S = 0.002  # facts wait at most this long on the loop before they are published
DNS_INTERVAL_S = 5.0  # how often a `dns://` peer name is resolved again
INF = float("inf")


def parse_peer(spec: str) -> str:
    """`tcp://host:port`, `ipc://path` or `dns://name:port` (every address the name resolves to, as a
    Kubernetes headless Service gives); raises ValueError naming what is wrong."""
    spec = spec.strip()
    scheme, sep, rest = spec.partition("://")
    if scheme == "dns":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peer {spec!r}: use dns://NAME:PORT (a name resolving to every replica)")
        return spec
    if not sep or scheme not in ZMQ_TRANSPORTS or not rest:
        raise ValueError(f"peer {spec!r} must be a ZMQ address such as tcp://10.0.0.7:5600, ipc:///run/kvroute/0 "
                         "or dns://kvroute-peers:5600")
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or "*" in host:
            raise ValueError(f"peer {spec!r}: use tcp://HOST:PORT (a reachable HOST, a PORT number)")
    return spec


class ReplicaSync:
    """Publishes this replica's facts on `bind` and follows every peer in `peers` (see `parse_peer`)."""

    def __init__(self, router: Router, bind: str, peers: Sequence[str] = (), heartbeat: float = 0.5,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.bind = bind
        self.peer_specs = [parse_peer(p) for p in peers]
        self.heartbeat = heartbeat
        self.epoch = facts.new_epoch()
        self.publisher: FactPublisher | None = None
        self.peers: dict[str, PeerSubscriber] = {}
        self._self_addresses: set[str] = set()
        self._pending: list[tuple[int, Any]] = []
        self._own: dict[int, tuple[InFlight, RequestContext, int, str, int]] = {}
        self._remote: dict[str, dict[int, InFlight]] = {}  # peer -> its request id -> our record of it
        self._lost: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_publish = 0.0
        self.published_facts = 0
        self.applied_facts = 0

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.publisher = FactPublisher(self.bind, self.epoch, self.snapshot, metrics=self.metrics)
        self.publisher.start()
        self.publisher.publish(facts.encode([]))  # seq 0: a snapshot always has a seq to carry
        self._last_publish = self._loop.time()
        self.router.replicas = self
        for spec in self.peer_specs:
            if spec.startswith("dns://"):
                self._tasks.append(self._loop.create_task(self._follow_dns(spec), name=f"replica-dns-{spec}"))
            else:
                self._follow(spec)
        self._tasks.append(self._loop.create_task(self._heartbeat(), name="replica-heartbeat"))
        log.info("replica %s publishing on %s (replay %s), peers %s", self.epoch, self.publisher.endpoint,
                 self.publisher.replay_endpoint, self.peer_specs)

    async def close(self) -> None:
        if self.router.replicas is self:
            self.router.replicas = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for address in list(self.peers):
            await self._unfollow(address)
        if self.publisher is not None:
            await self.publisher.close()

    @property
    def endpoint(self) -> str | None:
        """The bound PUB address (what peers pass as `--peer`)."""
        return self.publisher.endpoint if self.publisher else None

    def _follow(self, address: str) -> None:
        if address in self.peers or address in self._self_addresses:
            return
        sub = PeerSubscriber(address, self, self.heartbeat)
        self.peers[address] = sub
        self._lost.add(address)  # until its first batch or snapshot is applied
        sub.start()

    async def _unfollow(self, address: str) -> None:
        sub = self.peers.pop(address, None)
        if sub is not None:
            await sub.close()
        self.clear(address)
        self._remote.pop(address, None)
        self._lost.discard(address)

    async def _follow_dns(self, spec: str) -> None:
        """Follow every address the name resolves to (ourselves excluded by epoch), re-resolving as pods come and go."""
        host, _, port = spec[len("dns://"):].rpartition(":")
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                found = {f"tcp://{'[%s]' % a[4][0] if ':' in a[4][0] else a[4][0]}:{port}" for a in infos}
            except OSError as e:
                log.warning("replica peers %s: cannot resolve (%s); keeping the peers we have", spec, e)
                found = None
            if found is not None:
                for address in found - set(self.peers):
                    self._follow(address)
                for address in [a for a in self.peers if a not in found]:
                    await self._unfollow(address)
            await asyncio.sleep(DNS_INTERVAL_S)

    async def _heartbeat(self) -> None:
        """An empty batch when nothing was published for `heartbeat` s: peers tell silence from idleness."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat / 2)
            if self.publisher is not None and loop.time() - self._last_publish >= self.heartbeat:
                self._flush()

    # ---- the router's hooks (request path: queue only) ---------------------------------------------

    def begun(self, rec: InFlight, ctx: RequestContext, matched: int, strategy: str) -> None:
        # A blind context (a policy that does not read prompts) has no hashes: peers record nothing either.
        tail = ctx.tail if not ctx.blind else None
        entry = (rec, ctx, matched, strategy, self.router.walker.tail_blocks(tail) if tail is not None else 0)
        self._own[rec.id] = entry
        self._queue(BEGIN, entry)

    def first_byte(self, rec: InFlight) -> None:
        if rec.id in self._own:
            self._queue(FIRST, rec.id)

    def ended(self, rec: InFlight) -> None:
        if self._own.pop(rec.id, None) is not None:
            self._queue(END, rec.id)

    # ---- admin changes (made on one replica, applied by all) ---------------------------------------

    def reset(self) -> None:
        self._queue(RESET, [RESET])

    def strategy(self, name: str) -> None:
        self._queue(STRATEGY, [STRATEGY, name])

    def backend_added(self, url: str) -> None:
        self._queue(ADD, [ADD, url])

    def backend_removed(self, url: str) -> None:
        self._queue(REMOVE, [REMOVE, url])

    def _queue(self, kind: int, item: Any) -> None:
        self._pending.append((kind, item))
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_later(FLUSH_S, self._flush)

    # ---- publishing ---------------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        if self.publisher is None:
            return
        pending, self._pending = self._pending, []
        t = now()
        out = []
        for kind, item in pending:
            if kind == BEGIN:
                out.append(self._begin_fact(item, t))
            elif kind in (FIRST, END):
                out.append([kind, item])
            else:
                out.append(item)
        self.publisher.publish(facts.encode(out))
        self.published_facts += len(out)
        assert self._loop is not None
        self._last_publish = self._loop.time()

    def _begin_fact(self, entry: tuple[InFlight, RequestContext, int, str, int], t: float) -> list[Any]:
        rec, ctx, matched, strategy, tail_blocks = entry
        st = ctx.tail
        tail = None if st is None else tail_wire(st, (st.hasher or self.router.hasher).block_size, tail_blocks)
        exp = rec.expected_first_token
        return [BEGIN, rec.id, rec.backend.url, strategy, list(ctx.hashes), matched, tail, ctx.num_tokens,
                rec.max_tokens, rec.prompt_blocks, rec.uncached_blocks, rec.prefill_s,
                -1.0 if exp == INF else max(0.0, exp - t), rec.decode_wall, rec.held_blocks, rec.first_byte_at is not None,
                rec.lora]

    def snapshot(self) -> bytes:
        """The whole approximate index (each backend's blocks oldest first, and pending tails) and our own
        requests in flight, after publishing what is pending (so it covers every published seq)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._pending:
            self._flush()
        r = self.router
        approx = [url for url in r.index.backends() if not r.kv_events.is_exact(url)]
        blocks = [[url, r.index.lru(url)] for url in approx]
        tails = []
        for url, p in r.index.tails():
            if url not in approx:
                continue
            try:
                w = p.prompt.wire(p.anchor, p.blocks) if isinstance(p.prompt, RemotePrompt) \
                    else tail_wire(p.prompt, (p.prompt.hasher or r.hasher).block_size, p.blocks, p.anchor)
            except ValueError:  # hashed otherwise since (the backends' hashing changed)
                continue
            if w is not None:
                tails.append([url, p.anchor, w])
        t = now()
        begins = [self._begin_fact(e, t) for e in self._own.values()]
        return facts.encode([[SNAPSHOT, blocks, tails, begins]])

    # ---- applying a peer's facts (PeerSink) --------------------------------------------------------

    def apply(self, peer: str, batch: list[list[Any]]) -> None:
        remote = self._remote.setdefault(peer, {})
        r = self.router
        for f in batch:
            kind = f[0]
            if kind == BEGIN:
                self._apply_begin(remote, f)
            elif kind == FIRST:
                rec = remote.get(f[1])
                if rec is not None and rec.first_byte_at is None:
                    rec.backend.started(rec, now())
            elif kind == END:
                rec = remote.pop(f[1], None)
                if rec is not None:
                    self._finish(rec)
            elif kind == SNAPSHOT:
                self._apply_snapshot(remote, f)
            elif kind == RESET:
                r.reset()
            elif kind == STRATEGY:
                try:
                    r.set_strategy(f[1])
                except APIError:
                    log.warning("replica peer %s switched to strategy %r, unknown here; keeping %s", peer, f[1], r.strategy)
            elif kind == ADD:
                r.add_backend(f[1])
            elif kind == REMOVE:
                for rid, rec in list(remote.items()):
                    if rec.backend.url == f[1]:
                        del remote[rid]
                        self._finish(rec)
                r.remove_backend(f[1])
        self.applied_facts += len(batch)

    def _apply_begin(self, remote: dict[int, InFlight], f: list[Any]) -> None:
        (_, rid, url, strategy, hashes, matched, tail, num_tokens, max_tokens, prompt_blocks, uncached, prefill_s,
         expect_in, decode_wall, held_blocks, started, *rest) = f
        lora = rest[0] if rest and isinstance(rest[0], str) else None  # absent from a peer of an older release
        r = self.router
        b = r.registry.get(url)
        if b is None:
            return  # a backend we were not configured with: nothing of ours to record
        old = remote.pop(rid, None)
        if old is not None:
            self._finish(old)
        t = now()
        rec = InFlight(r.registry.new_request_id(), b, prompt_blocks, uncached, max_tokens, prefill_s,
                       INF if expect_in < 0 else t + expect_in, t,
                       decode_wall=decode_wall, held_blocks=held_blocks, lora=lora)
        b.add(rec)
        remote[rid] = rec
        if started:
            b.started(rec, t)
        st = None
        tail_blocks = 0
        if tail is not None and hashes:
            st = RemotePrompt(hashes[-1], tail)
            tail_blocks = tail[6]
        if r.index.pending_map():
            self._settle_tails(hashes)
        # As Router.begin records its own prompt.
        if r.kv_events.is_exact(url):
            r.kv_events.routed(rec.id, url, hashes, st, tail_blocks)
        elif st is not None:
            r.index.record_routed(url, hashes, st, tail_blocks)
        else:
            r.index.record_routed(url, hashes)
        if st is None and hashes:
            r.index.mark_prompt_end(hashes[-1])
        policy = r.policies.get(strategy)
        if policy is not None:
            ctx = RequestContext(hashes, num_tokens, max_tokens, None, r.index, _matches={url: matched} if matched else {},
                                 tail=st, completer=self._complete)
            policy.observe(ctx, b)

    def _settle_tails(self, hashes: list[int]) -> None:
        """A peer's prompt ran through the anchors of pending tails: its sender resolved them (its walk
        went on past them), so resolve them here too rather than keep guessing their size (a tail's
        estimate counts against its backend's capacity until it is hashed)."""
        r = self.router
        pending = r.index.pending_map()
        for h in hashes[:-1]:
            tails = pending.get(h)
            if not tails:
                continue
            for p in list(tails):
                other = p.prompt
                if isinstance(other, RemotePrompt):
                    other.finish(None, r.walker)
                else:
                    r.walker.finish(other)
                if h in other.hashes:
                    r.index.resolve(p, other.hashes[other.hashes.index(h) + 1:])

    def _complete(self, ctx: RequestContext, stop_at: int | None = None) -> None:
        """A peer's lazy prompt, hashed to the end when a policy needs all of it (sglang's tree)."""
        st = ctx.tail
        if st is None:
            return
        st.finish(None, self.router.walker)
        ctx.hashes = [*ctx.hashes, *st.hashes[1:]]
        ctx.tail = None

    def _apply_snapshot(self, remote: dict[int, InFlight], f: list[Any]) -> None:
        _, blocks, tails, begins = f
        r = self.router
        approx = {url for url in r.index.backends() if not r.kv_events.is_exact(url)}
        for url, anchor, w in tails:
            if url in approx:
                r.index.record_routed(url, [anchor], RemotePrompt(anchor, w), w[6])
        for b in begins:
            self._apply_begin(remote, b)
        for url, lru in blocks:
            if url in approx:
                r.index.record_routed(url, lru[::-1])  # touched oldest first: the peer's LRU order

    def _finish(self, rec: InFlight) -> None:
        rec.backend.remove(rec)
        self.router.kv_events.finished(rec.id)

    def clear(self, peer: str) -> None:
        """The peer's requests in flight can no longer be followed: they stop counting as load."""
        remote = self._remote.get(peer)
        if remote:
            for rec in remote.values():
                self._finish(rec)
            remote.clear()

    def desync(self, peer: str, reason: str) -> None:
        if peer not in self._lost:
            log.warning("replica peer %s lost (%s): routing on what we know; its in-flight requests %s",
                        peer, reason, "dropped" if reason in ("disconnect", "silence", "restart") else "kept")
        self._lost.add(peer)

    def resynced(self, peer: str) -> None:
        if peer in self._lost:
            log.info("replica peer %s followed", peer)
        self._lost.discard(peer)

    def is_self(self, peer: str) -> None:
        """A peer address that turned out to be this replica (a DNS name resolving to every replica)."""
        if peer in self._self_addresses:
            return
        self._self_addresses.add(peer)
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(self._unfollow(peer)))

    # ---- what /admin and /metrics show --------------------------------------------------------------

    async def local_metrics(self, own: bytes, timeout: float = 1.0) -> bytes:
        """`own` exposition merged with the other workers' (ipc:// peers: replicas of one proxy on this host;
        a peer that does not answer in `timeout` is left out, and the answer says how many answered)."""
        peers = [s for a, s in self.peers.items() if a.startswith("ipc://") and s.source.replay_endpoint]
        if not peers:
            return own
        texts = await asyncio.gather(*(self._peer_metrics(s.source.replay_endpoint, timeout) for s in peers))
        got = [t.decode() for t in texts if t is not None]
        merged = aggregate.merge(own.decode(), got)
        return (merged + "# HELP kvroute_workers_answering Workers whose counters this answer sums\n"
                "# TYPE kvroute_workers_answering gauge\n" f"kvroute_workers_answering {1 + len(got)}.0\n").encode()

    @staticmethod
    async def _peer_metrics(endpoint: str, timeout: float) -> bytes | None:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", aggregate.METRICS_REQUEST])
            if not await sock.poll(int(timeout * 1000), zmq.POLLIN):
                return None
            frames = await sock.recv_multipart()
            return frames[2] if len(frames) == 3 and frames[1] == aggregate.METRICS_REQUEST else None
        finally:
            sock.close(linger=0)

    @property
    def lost(self) -> list[str]:
        return sorted(self._lost)

    def status(self) -> dict[str, Any]:
        peers = []
        for address, sub in self.peers.items():
            peers.append({
                "address": address, "synced": address not in self._lost, "epoch": sub.epoch,
                "last_seq": sub.stats.last_seq, "in_flight": len(self._remote.get(address, ())),
                "desyncs": {k: v for k, v in sub.stats.desyncs.items() if v}, "replays": sub.stats.replays,
            })
        pub = self.publisher
        return {
            "epoch": self.epoch, "publish": pub.endpoint if pub else None, "replay": pub.replay_endpoint if pub else None,
            "next_seq": pub.next_seq if pub else 0, "peers": peers, "peers_lost": len(self._lost),
            "own_in_flight": len(self._own), "published_facts": self.published_facts, "applied_facts": self.applied_facts,
        }

    def desync_counts(self) -> dict[tuple[str, str], int]:
        return {(a, reason): sub.stats.desyncs.get(reason, 0) for a, sub in self.peers.items() for reason in DESYNC_REASONS}
