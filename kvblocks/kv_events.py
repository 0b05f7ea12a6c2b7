"""vLLM 0.33's KV-event wire format: what a backend publishes as its cache changes.

ZMQ PUB, 3 frames per message: [topic, sequence (8-byte big-endian), msgpack batch]; a batch is
[ts, [event maps tagged by "type"], data_parallel_rank], one batch per engine step with events.
Hashes travel as ints (last 8 bytes of the digest) by default, raw digests when asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from .hashing import hash_to_int

MEDIUM_GPU = "GPU"
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


def _event_to_map(ev: KVEvent) -> dict[str, Any]:
    if isinstance(ev, BlockStored):
        extra = ev.extra_keys if ev.extra_keys is not None else [None] * len(ev.block_hashes)
        return {
            "type": "BlockStored",
            "block_hashes": list(ev.block_hashes),
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": list(ev.token_ids),
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
            "extra_keys": extra,
            "group_idx": ev.group_idx,
        }
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": list(ev.block_hashes), "medium": ev.medium, "group_idx": ev.group_idx}
    if isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {ev!r}")


def _event_from_map(m: Any) -> KVEvent:
    if not isinstance(m, dict):
        raise ValueError("KV events must be maps tagged by 'type' (positional arrays are the pre-0.33 format)")
    kind = m.get("type")
    if kind == "BlockStored":
        return BlockStored(
            block_hashes=list(m["block_hashes"]),
            parent_block_hash=m.get("parent_block_hash"),
            token_ids=list(m.get("token_ids") or []),
            block_size=int(m.get("block_size") or 16),
            lora_id=m.get("lora_id"),
            medium=m.get("medium"),
            lora_name=m.get("lora_name"),
            extra_keys=m.get("extra_keys"),
            group_idx=m.get("group_idx"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(block_hashes=list(m["block_hashes"]), medium=m.get("medium"), group_idx=m.get("group_idx"))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


def encode_batch(batch: EventBatch) -> bytes:
    return msgpack.packb([batch.ts, [_event_to_map(e) for e in batch.events], batch.data_parallel_rank], use_bin_type=True)


def decode_batch(payload: bytes) -> EventBatch:
    """Parse a msgpack batch; raises ValueError on anything that is not vLLM 0.33's format."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"undecodable KV-event payload: {e}") from e
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise ValueError("KV-event batch must be [ts, events, data_parallel_rank]")
    rank = raw[2] if len(raw) > 2 else None
    return EventBatch(ts=float(raw[0]), events=[_event_from_map(m) for m in raw[1]], data_parallel_rank=rank)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)
