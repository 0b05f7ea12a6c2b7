"""The emulator's publisher speaks vLLM 0.33's wire format, checked by decoding raw frames independently."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from emulator.kv_events import (
    KVEventsConfig,
    NullEventPublisher,
    ZmqEventPublisher,
    binds,
    make_publisher,
    offset_endpoint,
)
from kvblocks import BlockHasher, hash_to_int
from kvblocks.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from .helpers import stored

BIG = 2**64 - 3  # int hashes are uint64 on the wire, often >= 2^63


def test_config_parses_vllm_json_with_vllm_defaults():
    cfg = KVEventsConfig.from_json('{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv-events"}')
    assert (cfg.endpoint, cfg.topic, cfg.buffer_steps, cfg.hwm, cfg.max_queue_size) == ("tcp://*:5557", "kv-events", 10_000, 100_000, 100_000)
    assert cfg.replay_endpoint is None and cfg.active
    assert KVEventsConfig.from_json('{"enable_kv_cache_events":true}').publisher == "zmq"
    assert KVEventsConfig.from_json("{}").publisher == "null" and not KVEventsConfig().active
    assert not KVEventsConfig.from_dict({"enable_kv_cache_events": True, "publisher": "null"}).active


@pytest.mark.parametrize(
    "text, msg",
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"enable_kv_cache_events":true,"publisher":"kafka"}', "unknown KV event publisher"),
        ('{"enable_kv_cache_events":true,"endpont":"tcp://*:1"}', "unknown kv-events-config key"),
        ('{"buffer_steps":-1}', "buffer_steps"),
        ('{"endpoint":"localhost:5557"}', "ZMQ address"),
    ],
)
def test_config_rejects_bad_input(text, msg):
    with pytest.raises(ValueError, match=msg):
        KVEventsConfig.from_json(text)


def test_bind_connect_rule_and_data_parallel_offset():
    assert binds("tcp://*:5557") and binds("tcp://[::]:5557") and binds("ipc:///tmp/kv") and binds("inproc://kv")
    assert binds("tcp://127.0.0.1:0")
    assert not binds("tcp://127.0.0.1:5557") and not binds("tcp://router.local:5557")
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://10.0.0.1:5557", 1) == "tcp://10.0.0.1:5558"
    assert offset_endpoint("inproc://cache", 2) == "inproc://cache_dp2"
    assert offset_endpoint(None, 2) is None
    with pytest.raises(ValueError):
        offset_endpoint("udp://x:1", 1)


def test_null_publisher_when_disabled():
    assert isinstance(make_publisher(None), NullEventPublisher)
    assert isinstance(make_publisher('{"enable_kv_cache_events": false}'), NullEventPublisher)
    assert make_publisher({"publisher": "null", "enable_kv_cache_events": True}).publish([AllBlocksCleared()]) is None


async def test_frames_are_vllm_layout_and_payload_decodes_with_plain_msgpack():
    pub = make_publisher({"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:*", "topic": "kv-events"})
    assert isinstance(pub, ZmqEventPublisher) and pub.last_endpoint.startswith("tcp://127.0.0.1:")
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sub.connect(pub.last_endpoint)
    got: list[list[bytes]] = []

    async def drain():
        while await sub.poll(0):
            got.append(await sub.recv_multipart())

    digests = BlockHasher().hashes(list(range(1000, 1032)))
    try:
        deadline = time.monotonic() + 5
        while not got:  # slow joiner: publish until the subscription has reached the publisher
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.publish([BlockRemoved([BIG])])
            await sub.poll(50)
            await drain()
        warm = len(got)
        assert pub.publish([]) is None  # empty steps send nothing
        step = [
            BlockRemoved([BIG]),
            BlockStored([hash_to_int(d) for d in digests], None, list(range(1000, 1032)), 16),
            BlockStored([BIG], hash_to_int(digests[1]), list(range(16)), 16),
        ]
        seq = pub.publish(step)
        clear_seq = pub.publish([AllBlocksCleared()])
        while len(got) < warm + 2:
            assert await sub.poll(5000), "published batch never arrived"
            await drain()
    finally:
        sub.close(linger=0)
        pub.close()
    topic, seq_frame, payload = got[-2]
    assert topic == b"kv-events" and len(seq_frame) == 8 and int.from_bytes(seq_frame, "big") == seq
    seqs = [int.from_bytes(f[1], "big") for f in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[-1] == clear_seq
    ts, events, rank = msgpack.unpackb(payload, raw=False)
    assert isinstance(ts, float) and rank == 0 and len(events) == 3
    removed, first, second = events
    assert removed == {"type": "BlockRemoved", "block_hashes": [BIG], "medium": "GPU", "group_idx": 0}
    assert first == {
        "type": "BlockStored",
        "block_hashes": [7322446309363477352, 17027874615116373601],  # vLLM's test vector
        "parent_block_hash": None,
        "token_ids": list(range(1000, 1032)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    assert second["block_hashes"] == [BIG] and second["parent_block_hash"] == 17027874615116373601
    assert msgpack.unpackb(got[-1][2])[1] == [{"type": "AllBlocksCleared"}]


async def test_replay_router_serves_buffer_from_start_seq_then_end_marker():
    pub = ZmqEventPublisher(
        KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3)
    )
    for i in range(5):
        assert pub.publish([stored([i])]) == i
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(pub.replay_last_endpoint)
    try:
        replies = []
        for start in (0, 3):
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            frames: list[list[bytes]] = []
            while True:
                assert await dealer.poll(5000), "replay did not answer"
                f = await dealer.recv_multipart()
                frames.append(f)
                if f[2] == (-1).to_bytes(8, "big", signed=True):
                    break
            replies.append(frames)
    finally:
        dealer.close(linger=0)
        pub.close()
    # buffer_steps=3 keeps seqs 2..4; a request from 0 gets what is left, from 3 gets 3..4. The
    # frames are vLLM 0.32/0.33's _service_replay as a DEALER sees them, written out literally:
    # [b"", topic, seq, payload] per batch, then [b"", b"", -1, b""].
    for frames, want in zip(replies, ([2, 3, 4], [3, 4])):
        assert all(f[0] == b"" and len(f) == 4 for f in frames)
        assert all(f[1] == b"" for f in frames[:-1])  # the publisher's topic (default: empty)
        assert [int.from_bytes(f[2], "big") for f in frames[:-1]] == want
        assert frames[-1][1] == b"" and frames[-1][3] == b""
        assert [msgpack.unpackb(f[3])[1][0]["block_hashes"] for f in frames[:-1]] == [[w] for w in want]


async def test_connect_mode_publisher_reaches_a_bound_subscriber():
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    addr = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub = make_publisher({"enable_kv_cache_events": True, "endpoint": addr}, data_parallel_rank=0)
    got = []
    deadline = time.monotonic() + 5
    try:
        while not got:
            assert time.monotonic() < deadline, "connecting publisher never reached the subscriber"
            pub.publish([AllBlocksCleared()])
            if await sub.poll(20):
                got.append(await sub.recv_multipart())
    finally:
        sub.close(linger=0)
        pub.close()
    assert got[0][0] == b"" and msgpack.unpackb(got[0][2])[1] == [{"type": "AllBlocksCleared"}]


def test_publish_after_close_raises():
    pub = ZmqEventPublisher(KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*"))
    pub.close()
    pub.close()
    with pytest.raises(RuntimeError):
        pub.publish([AllBlocksCleared()])
