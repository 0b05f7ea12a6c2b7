"""One peer replica's stream, followed with `KVEventSubscriber`'s machinery.

The base class already does what a replica needs: sequence order, gap detection, replay over a
DEALER, restart and disconnect detection, silence while busy (a peer is always "busy": it sends a
heartbeat batch at least every `heartbeat` seconds). What differs:

- the payload is a batch of replica facts (`facts.py`), handed to the sink's `apply`;
- the replay endpoint comes from the topic of the peer's messages, not from configuration;
- a resync asks from the seq after the last applied one, and the answer may be a snapshot
  tagged with a later seq: live batches up to that seq are then already covered and skipped;
- a new epoch in the topic is a restarted peer (its requests in flight are gone).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Protocol

from ..index.kv_events import DISCONNECT, RESTART, SILENCE, UNDECODABLE, KVEventSource, KVEventSubscriber
from . import facts

log = logging.getLogger("kvroute.proxy.replicas")


class PeerSink(Protocol):
    """What a peer's stream is applied to (`ReplicaSync`)."""

    epoch: str

    def apply(self, peer: str, batch: list[list[Any]]) -> None: ...

    def clear(self, peer: str) -> None: ...

    def desync(self, peer: str, reason: str) -> None: ...

    def resynced(self, peer: str) -> None: ...

    def is_self(self, peer: str) -> None: ...


class PeerSubscriber(KVEventSubscriber):
    """Follows one peer replica's PUB address; `self.backend` is that address."""

    def __init__(self, address: str, sink: PeerSink, heartbeat: float, replay_timeout: float = 2.0) -> None:
        super().__init__(address, KVEventSource(address, facts.TOPIC_PREFIX.decode()), sink,  # type: ignore[arg-type]
                         busy=lambda: True, silence_timeout=max(3 * heartbeat, 0.1), replay_timeout=replay_timeout)
        self.epoch: str | None = None
        self._covered: int | None = None  # a snapshot's seq: live batches up to it are already in it
        self._replay_answered = False  # whether the last resync reached the peer

    # ---- live stream --------------------------------------------------------------------------------

    async def _on_message(self, frames: list[bytes]) -> None:
        ident = facts.parse_topic(frames[0]) if frames else None
        if ident is not None:
            epoch, replay = ident
            if epoch == self.sink.epoch:
                self.sink.is_self(self.backend)  # a DNS name that resolves to us too
                return
            if replay != self.source.replay_endpoint:
                self.source = dataclasses.replace(self.source, replay_endpoint=self._reachable(replay))
            if self.epoch is not None and epoch != self.epoch:
                log.warning("replica peer %s restarted (new epoch)", self.backend)
                self._desync(RESTART)
                self._reset()
            self.epoch = epoch
        if self._covered is not None and len(frames) == 3 and len(frames[1]) == 8:
            seq = int.from_bytes(frames[1], "big")
            if seq <= self._covered:
                self._last_heard = asyncio.get_running_loop().time()
                return
            self._covered = None
        await super()._on_message(frames)

    def _reachable(self, replay: str) -> str:
        """A replay endpoint bound on a wildcard is reached at the host we reached the PUB at."""
        scheme, _, rest = replay.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme == "tcp" and host in ("0.0.0.0", "*", "[::]", "::"):
            return f"tcp://{self.source.endpoint.partition('://')[2].rpartition(':')[0]}:{port}"
        return replay

    def _apply(self, seq: int, payload: bytes) -> bool:
        try:
            batch = facts.decode(payload)
        except ValueError as e:
            log.warning("replica peer %s: batch %d undecodable: %s", self.backend, seq, e)
            self._desync(UNDECODABLE)
            self._reset()
            self._applied, self._last_payload = seq, payload
            return False
        if batch and batch[0][0] == facts.SNAPSHOT:
            self.sink.clear(self.backend)
            self._covered = seq
        self.sink.apply(self.backend, batch)
        self._applied = seq
        self._last_payload = payload
        self.stats.last_seq = seq
        self.stats.batches_applied += 1
        self.stats.events_applied += len(batch)
        return True

    # ---- resync -------------------------------------------------------------------------------------

    async def _catch_up(self, missed: str | None = None) -> bool:
        """Every batch after the last applied one, or a snapshot (then counted as `missed` if a loss was known)."""
        if not self.source.replay_endpoint:
            return False
        start = 0 if self._applied is None else self._applied + 1
        items = await self._fetch_replay(start)
        self._replay_answered = items is not None
        if items is None:
            return False
        if missed:
            self._desync(missed)
        for seq, payload in items:
            if self._applied is not None and seq <= self._applied and seq != self._covered:
                continue
            self._apply(seq, payload)
            self._replayed[seq] = payload
            self._replayed_max = seq
        return True

    def _desync(self, reason: str) -> None:
        was = self.stats.synced
        super()._desync(reason)
        if was and (reason == DISCONNECT or (reason == SILENCE and not self._replay_answered)):
            # The peer is gone: its requests in flight cannot be followed any more (and a restarted one
            # lost them): drop them, and ask for a snapshot when it is back. (Silence that a replay
            # bridged was lost batches from a live peer: caught up, nothing to drop.)
            self.sink.clear(self.backend)
            self._applied = None
            self._covered = None
