"""vLLM 0.33's KV-event wire format: what a backend publishes as its cache changes.

ZMQ PUB, 3 frames per message: [topic, sequence (8-byte big-endian), msgpack batch]; a batch is
[ts, [event maps tagged by "type"], data_parallel_rank], one batch per engine step with events.
Hashes travel as ints (last 8 bytes of the digest) by default, raw digests when asked.

Replay (a ROUTER beside the PUB) is framed here once, for our publisher and our subscriber both, as
vLLM 0.32/0.33's `ZmqEventPublisher._service_replay` frames it: a DEALER sends [b"", start_seq]; each
buffered batch comes back as [b"", topic, seq, payload] and the end as [b"", b"", seq -1, b""].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Union

import msgpack

from .hashing import hash_to_int

MEDIUM_GPU = "GPU"
KV_CACHE_SPEC_FULL = "full_attention"
REPLAY_END_SEQ = -1


@dataclass(frozen=True)
class BlockStored:
    """Consecutive new full blocks cached by one request; `parent_block_hash` precedes the first."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = 0
    kv_cache_spec_kind: str | None = KV_CACHE_SPEC_FULL
    kv_cache_spec_sliding_window: int | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted from the cache (vLLM sends one hash per event)."""

    block_hashes: list[int | bytes]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = 0


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(frozen=True)
class EventBatch:
    """One engine step's events."""

    ts: float
    events: list[KVEvent] = field(default_factory=list)
    data_parallel_rank: int | None = 0


def wire_hash(digest: bytes, use_int: bool = True) -> int | bytes:
    """A digest as it travels in events: the int form by default, raw bytes otherwise."""
    return hash_to_int(digest) if use_int else digest


def int_hash(h: int | bytes) -> int:
    """The int key of a wire hash: raw digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) become their int form."""
    return hash_to_int(h) if isinstance(h, bytes) else h


def _event_to_map(ev: KVEvent) -> dict[str, Any]:
    """vLLM's msgspec map: fields without a default always present, defaulted ones omitted when None."""
    if isinstance(ev, BlockStored):
        extra = ev.extra_keys if ev.extra_keys is not None else [None] * len(ev.block_hashes)
        m: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(ev.block_hashes),
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
            "extra_keys": extra,
        }
        _put_optional(m, "group_idx", ev.group_idx)
        _put_optional(m, "kv_cache_spec_kind", ev.kv_cache_spec_kind)
        _put_optional(m, "kv_cache_spec_sliding_window", ev.kv_cache_spec_sliding_window)
        return m
    if isinstance(ev, BlockRemoved):
        m = {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes), "medium": ev.medium}
        _put_optional(m, "group_idx", ev.group_idx)
        return m
    if isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {ev!r}")


def _put_optional(m: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        m[key] = value


def _hashes(value: Any, what: str) -> list[int | bytes]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(h, (int, bytes)) for h in value):
        raise ValueError(f"{what} must be a list of int or bytes block hashes")
    return list(value)


def _event_from_map(m: Any) -> KVEvent:
    if not isinstance(m, dict):
        raise ValueError("KV events must be maps tagged by 'type' (positional arrays are the pre-0.33 format)")
    kind = m.get("type")
    if kind == "BlockStored":
        parent = m.get("parent_block_hash")
        if parent is not None and not isinstance(parent, (int, bytes)):
            raise ValueError("parent_block_hash must be an int, bytes or null")
        token_ids = m.get("token_ids") or []
        if not isinstance(token_ids, (list, tuple)):
            raise ValueError("token_ids must be a list")
        block_size = m.get("block_size")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError("block_size must be a positive int")
        return BlockStored(
            block_hashes=_hashes(m.get("block_hashes"), "BlockStored.block_hashes"),
            parent_block_hash=parent,
            token_ids=list(token_ids),
            block_size=block_size,
            lora_id=m.get("lora_id"),
            medium=m.get("medium"),
            lora_name=m.get("lora_name"),
            extra_keys=m.get("extra_keys"),
            group_idx=m.get("group_idx"),
            kv_cache_spec_kind=m.get("kv_cache_spec_kind"),
            kv_cache_spec_sliding_window=m.get("kv_cache_spec_sliding_window"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(
            block_hashes=_hashes(m.get("block_hashes"), "BlockRemoved.block_hashes"),
            medium=m.get("medium"),
            group_idx=m.get("group_idx"),
        )
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


def encode_batch(batch: EventBatch) -> bytes:
    """The outer batch stays a positional array (as vLLM's); only the events are maps."""
    return msgpack.packb([batch.ts, [_event_to_map(e) for e in batch.events], batch.data_parallel_rank], use_bin_type=True)


def decode_batch(payload: bytes) -> EventBatch:
    """Parse a msgpack batch; raises ValueError on anything that is not vLLM 0.33's format."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"undecodable KV-event payload: {e}") from e
    if isinstance(raw, dict):
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise ValueError("KV-event batch must be [ts, events, data_parallel_rank]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, (int, float)) or not isinstance(events, (list, tuple)):
        raise ValueError("KV-event batch must be [ts (float), [events], data_parallel_rank]")
    rank = raw[2] if len(raw) > 2 else None
    return EventBatch(ts=float(ts), events=[_event_from_map(m) for m in events], data_parallel_rank=rank)


def encode_seq(seq: int) -> bytes:
    """8-byte big-endian sequence frame; -1 is the replay end marker."""
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)


# ---- replay framing (vllm/distributed/kv_events.py, ZmqEventPublisher._service_replay) ------------


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to ask for every buffered batch from `start_seq` on."""
    return [b"", start_seq.to_bytes(8, "big")]


def parse_replay_request(frames: Sequence[bytes]) -> int | None:
    """The start seq of a request as a ROUTER receives it ([client, b"", start]); None if malformed."""
    if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
        return None
    return int.from_bytes(frames[2], "big")


def replay_reply(topic: bytes, seq: int, payload: bytes) -> tuple[bytes, ...]:
    """One buffered batch as the ROUTER sends it, after the client's identity frame."""
    return (b"", topic, encode_seq(seq), payload)


def replay_end() -> tuple[bytes, ...]:
    """The end-of-replay marker, after the client's identity frame."""
    return (b"", b"", encode_seq(REPLAY_END_SEQ), b"")


def parse_replay_reply(frames: Sequence[bytes]) -> tuple[int, bytes]:
    """(seq, payload) of one reply as a DEALER receives it; seq == REPLAY_END_SEQ ends the replay.

    Accepts vLLM 0.32/0.33's [b"", topic, seq, payload] and the topic-less [b"", seq, payload] of
    earlier releases; raises ValueError on anything else.
    """
    if len(frames) == 4 and frames[0] == b"" and len(frames[2]) == 8:
        return decode_seq(frames[2]), frames[3]
    if len(frames) == 3 and frames[0] == b"" and len(frames[1]) == 8:
        return decode_seq(frames[1]), frames[2]
    raise ValueError(f"malformed replay reply ({len(frames)} frames; expected [b'', topic, seq, payload])")
