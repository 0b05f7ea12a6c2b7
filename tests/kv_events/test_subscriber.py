"""The proxy's subscriber over real ZMQ: applies events in order, detects gaps, restarts, corruption and
silence, falls back (desync) and resyncs by replay or by clearing and rebuilding."""
from __future__ import annotations

import pytest

from emulator.kv_events import KVEventsConfig, ZmqEventPublisher
from kvblocks import BlockHasher, hash_to_int
from kvblocks.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from proxy.index.kv_events import DISCONNECT, GAP, RESTART, SILENCE, UNDECODABLE, KVEventSource, KVEventSubscriber

from .helpers import LossyRelay, RecordingSink, eventually, stored, warm_up

B = "backend-0"


def publisher(replay: bool = False, endpoint: str = "tcp://127.0.0.1:*", topic: str = "kv-events") -> ZmqEventPublisher:
    return ZmqEventPublisher(
        KVEventsConfig(
            enable_kv_cache_events=True,
            endpoint=endpoint,
            replay_endpoint="tcp://127.0.0.1:*" if replay else None,
            topic=topic,
        )
    )


class Harness:
    """Publisher -> (optional lossy relay) -> subscriber -> recording sink, all on loopback."""

    def __init__(self, replay: bool = False, relay: bool = False, busy=None, silence: float = 15.0, topic: str = "kv-events"):
        self.pub = publisher(replay, topic=topic)
        self.relay = LossyRelay(self.pub.last_endpoint) if relay else None
        self.sink = RecordingSink()
        self.next_hash = 1
        source = KVEventSource(
            endpoint=self.relay.endpoint if self.relay else self.pub.last_endpoint,
            topic=topic,
            replay_endpoint=self.pub.replay_last_endpoint,
        )
        self.sub = KVEventSubscriber(B, source, self.sink, busy=busy, silence_timeout=silence, replay_timeout=0.3)
        self.sub.start()

    def store(self) -> int:
        h = self.next_hash
        self.next_hash += 1
        self.pub.publish([stored([h])])
        return h

    async def connect(self) -> None:
        """Slow joiner: store blocks until the subscriber has applied a live one and is synced."""
        applied = self.sub.stats.messages
        await warm_up(self.store, lambda: self.sub.stats.messages > applied and self.sub.synced)
        self.base, self.connected_at = self.sink.held(B), self.next_hash

    def published(self) -> set[int]:
        """What the backend holds that a subscriber could know: warm-up blocks it saw, plus all since."""
        return self.base | set(range(self.connected_at, self.next_hash))

    async def close(self) -> None:
        await self.sub.close()
        if self.relay:
            await self.relay.close()
        self.pub.close()


@pytest.fixture
async def harnesses():
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(**kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


async def test_round_trip_all_event_types_in_order(harnesses):
    h = harnesses()
    await h.connect()
    warm = h.published()
    digests = BlockHasher().hashes(list(range(1000, 1048)))
    ints = [hash_to_int(d) for d in digests]
    start = len(h.sink.calls)
    h.pub.publish([BlockStored(ints[:2], None, list(range(1000, 1032)), 16)])
    h.pub.publish([BlockRemoved([ints[1]]), BlockStored([ints[2]], ints[1], list(range(1032, 1048)), 16)])
    h.pub.publish([BlockRemoved([ints[2]])])
    await eventually(lambda: len(h.sink.calls) >= start + 4, what="four sink calls")
    assert h.sink.calls[start:] == [
        ("stored", B, ints[:2], None, 32, 16),
        ("removed", B, [ints[1]]),
        ("stored", B, [ints[2]], ints[1], 16, 16),
        ("removed", B, [ints[2]]),
    ]
    assert h.sink.held(B) == warm | {ints[0]}
    assert max(ints) >= 2**63 or min(ints) < 2**63  # uint64 values pass through unchanged
    h.pub.publish([AllBlocksCleared()])
    await eventually(lambda: h.sink.calls[-1] == ("clear", B), what="clear")
    assert h.sink.held(B) == set() and h.sub.synced and h.sink.kinds("desync") == []


async def test_many_batches_apply_in_sequence_order(harnesses):
    h = harnesses()
    await h.connect()
    truth = h.published()
    for i in range(200):
        if i % 3 == 2:
            victim = min(truth)
            truth.discard(victim)
            h.pub.publish([BlockRemoved([victim])])
        else:
            truth.add(h.store())
    last = h.pub.next_seq - 1
    await eventually(lambda: h.sub.stats.last_seq == last, what="all batches")
    assert h.sink.held(B) == truth and h.sink.kinds("desync") == []


async def test_raw_digest_hashes_become_their_int_form(harnesses):
    h = harnesses()
    await h.connect()
    digests = BlockHasher().hashes(list(range(1000, 1032)))
    h.pub.publish([BlockStored(list(digests), None, list(range(1000, 1032)), 16)])
    h.pub.publish([BlockStored([b"\x01" * 32], digests[1], list(range(16)), 16), BlockRemoved([digests[0]])])
    await eventually(lambda: len(h.sink.kinds("removed")) == 1, what="removal")
    tail = int.from_bytes(b"\x01" * 8, "big")
    assert h.sink.kinds("stored")[-2][2] == [7322446309363477352, 17027874615116373601]
    assert h.sink.kinds("stored")[-1][2:4] == ([tail], 17027874615116373601)
    assert h.sink.kinds("removed") == [("removed", B, [7322446309363477352])]


async def test_events_for_other_media_and_topics_are_ignored(harnesses):
    h = harnesses()
    await h.connect()
    before = h.sink.held(B)
    h.pub.publish([BlockStored([999], None, list(range(16)), 16, medium="CPU"), BlockRemoved([1], medium="CPU")])
    marker = h.store()
    await eventually(lambda: marker in h.sink.held(B), what="marker")
    assert h.sink.held(B) == before | {marker}
    other = publisher(topic="other-model")
    try:
        wrong_topic = KVEventSubscriber("b2", KVEventSource(other.last_endpoint, topic="kv-events"), h.sink)
        wrong_topic.start()
        right_topic = KVEventSubscriber("b3", KVEventSource(other.last_endpoint, topic="other"), h.sink)
        right_topic.start()
        await warm_up(lambda: other.publish([stored([7])]), lambda: right_topic.stats.messages > 0)
        assert wrong_topic.stats.messages == 0 and "b2" not in h.sink.blocks
        await wrong_topic.close()
        await right_topic.close()
    finally:
        other.close()


async def test_gap_triggers_desync_then_replay_recovers_exact_state(harnesses):
    h = harnesses(replay=True, relay=True)
    await h.connect()
    base = h.pub.next_seq
    h.relay.drop = {base, base + 1}
    for _ in range(4):
        h.store()
    await eventually(lambda: h.sub.stats.last_seq == base + 3 and h.sub.synced, what="recovery")
    assert h.sink.kinds("desync") == [("desync", B, GAP)]
    assert h.sink.calls[-1] == ("resynced", B)
    assert h.sink.held(B) == h.published()  # the dropped batches came back through replay
    assert h.sink.kinds("clear") == [] and h.sub.stats.desyncs[GAP] == 1
    h.store()
    await eventually(lambda: h.sink.held(B) == h.published(), what="live after replay")


async def test_gap_without_replay_clears_and_rebuilds_from_new_events(harnesses):
    h = harnesses(relay=True)
    await h.connect()
    base = h.pub.next_seq
    h.relay.drop = {base}
    lost = h.store()
    fresh = [h.store(), h.store()]
    await eventually(lambda: h.sub.stats.last_seq == base + 2, what="rebuild")
    assert h.sink.kinds("desync") == [("desync", B, GAP)] and h.sink.kinds("clear") == [("clear", B)]
    assert h.sub.synced and h.sink.held(B) == set(fresh) and lost not in h.sink.held(B)


async def test_undecodable_payload_desyncs_and_recovers(harnesses):
    h = harnesses(relay=True)
    await h.connect()
    base = h.pub.next_seq
    h.relay.corrupt = {base}
    h.store()
    await eventually(lambda: not h.sub.synced, what="desync on garbage")
    assert h.sink.kinds("desync") == [("desync", B, UNDECODABLE)]
    good = h.store()
    await eventually(lambda: h.sub.synced, what="resync")
    assert h.sink.held(B) == {good}


async def test_restarted_publisher_is_detected_from_sequence_numbers(tmp_path):
    """Behind a relay the subscriber never sees the connection drop: only the sequence going back."""
    endpoint = f"ipc://{tmp_path}/pub"
    sink = RecordingSink()
    first = publisher(endpoint=endpoint)
    relay = LossyRelay(endpoint)
    sub = KVEventSubscriber(B, KVEventSource(relay.endpoint, topic="kv-events"), sink)
    sub.start()
    second = None
    try:
        await warm_up(lambda: first.publish([stored([first.next_seq + 1])]), lambda: sub.synced)
        for _ in range(10):
            first.publish([stored([first.next_seq + 1])])
        last = first.next_seq
        await eventually(lambda: last in sink.held(B), what="first publisher's blocks")
        first.close()
        second = publisher(endpoint=endpoint)  # same backend, new process: seq restarts at 0
        await warm_up(
            lambda: second.publish([stored([500 + second.next_seq])]),
            lambda: sink.kinds("desync") != [] and sub.synced and 500 + second.next_seq - 1 in sink.held(B),
        )
        assert sink.kinds("desync") == [("desync", B, RESTART)]
        assert sink.held(B) and all(h >= 500 for h in sink.held(B))  # the old process's blocks are gone
    finally:
        await sub.close()
        await relay.close()
        first.close()
        if second is not None:
            second.close()


async def test_dropped_publisher_desyncs_at_once_and_replay_rebuilds_the_restarted_one(tmp_path):
    """ipc endpoints let the restarted backend come back on the same addresses (as a pod restart would)."""
    cfg = {"enable_kv_cache_events": True, "topic": "kv-events",
           "endpoint": f"ipc://{tmp_path}/pub", "replay_endpoint": f"ipc://{tmp_path}/replay"}
    sink = RecordingSink()
    first = ZmqEventPublisher(KVEventsConfig(**cfg))
    second = None
    sub = KVEventSubscriber(B, KVEventSource(cfg["endpoint"], "kv-events", cfg["replay_endpoint"]), sink, replay_timeout=0.3)
    sub.start()
    try:
        await warm_up(lambda: first.publish([stored([first.next_seq + 1])]), lambda: sub.stats.messages > 0 and sub.synced)
        n = first.next_seq
        assert sink.held(B) == set(range(1, n + 1))  # replay gave the subscriber the history it joined late for
        first.close()
        await eventually(lambda: not sub.synced, what="desync on dropped connection")
        assert sink.kinds("desync") == [("desync", B, DISCONNECT)]
        second = ZmqEventPublisher(KVEventsConfig(**cfg))
        second.publish([stored([500])])
        second.publish([stored([501])])
        await eventually(lambda: sub.synced, what="resync after reconnection")
        await eventually(lambda: sink.held(B) == {500, 501}, what="the new process's state, replayed")
        assert sink.kinds("desync") == [("desync", B, DISCONNECT)]
    finally:
        await sub.close()
        first.close()
        if second is not None:
            second.close()


async def test_silence_while_busy_falls_back_and_next_event_resyncs(harnesses):
    state = {"busy": False}
    h = harnesses(busy=lambda: state["busy"], silence=0.2)
    await h.connect()
    held = h.sink.held(B)
    state["busy"] = True
    await eventually(lambda: not h.sub.synced, what="silence desync")
    assert h.sink.kinds("desync") == [("desync", B, SILENCE)]
    marker = h.store()
    await eventually(lambda: h.sub.synced, what="resync on next event")
    assert h.sink.held(B) == held | {marker} and h.sink.kinds("clear") == []  # contiguous: nothing lost


async def test_idle_backend_is_never_declared_silent(harnesses):
    h = harnesses(busy=lambda: False, silence=0.05)
    await h.connect()
    checks = h.sub.stats.busy_checks
    # ten checks at >= 20 ms each: a quiet period several times the timeout, with the backend idle
    await eventually(lambda: h.sub.stats.busy_checks >= checks + 10, what="silence checks")
    assert h.sub.synced and h.sink.kinds("desync") == []


async def test_silence_with_replay_probes_a_quiet_publisher_and_stays_exact(harnesses):
    h = harnesses(replay=True, busy=lambda: True, silence=0.1)
    await h.connect()
    probes = h.sub.stats.replays
    await eventually(lambda: h.sub.stats.replays >= probes + 2, what="liveness probes")
    assert h.sub.synced and h.sink.kinds("desync") == []  # the ROUTER answered: quiet, not lost


async def test_publisher_connecting_to_a_bound_subscriber_and_dropping_it():
    sink = RecordingSink()
    sub = KVEventSubscriber(B, KVEventSource("tcp://127.0.0.1:*", topic="kv-events"), sink)
    sub.start()
    assert sub.bound_endpoint  # publishers connect to us: vLLM's connect mode
    pub = publisher(endpoint=sub.bound_endpoint)
    try:
        await warm_up(lambda: pub.publish([stored([pub.next_seq + 1])]), lambda: sub.synced)
        pub.close()
        await eventually(lambda: not sub.synced, what="desync on dropped publisher")
        assert sink.kinds("desync") == [("desync", B, DISCONNECT)]
    finally:
        await sub.close()
        pub.close()


def test_source_parsing():
    assert KVEventSource.parse("tcp://10.0.0.5:5557") == KVEventSource("tcp://10.0.0.5:5557")
    src = KVEventSource.parse({"endpoint": "tcp://h:5557", "topic": "kv-events", "replay_endpoint": "tcp://h:5558"})
    assert (src.topic, src.replay_endpoint) == ("kv-events", "tcp://h:5558")
    for bad in ({"topic": "x"}, {"endpoint": "h:1"}, {"endpoint": "tcp://h:1", "extra": 1}, 5):
        with pytest.raises(ValueError):
            KVEventSource.parse(bad)
