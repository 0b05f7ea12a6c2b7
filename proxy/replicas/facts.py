"""The wire form of what replicas tell each other: one msgpack batch of facts per flush.

A message is vLLM's KV-event framing, [topic, seq (8 bytes), payload], so `KVEventSubscriber` reads
it unchanged. The topic names the publishing replica: `kvroute.replica <epoch> <replay endpoint>`.
The epoch is random per process start, so a restarted replica (its seq back at 0) is told apart
from a gap without decoding, and the replay endpoint travels with every message, so a peer needs
only the PUB address (`--peer tcp://host:port`, or a DNS name), even with ephemeral ports.

A payload is a list of facts, each a list whose first item is its kind:

    BEGIN  rid url strategy hashes matched tail num_tokens max_tokens prompt_blocks uncached
           prefill_s expect_in decode_wall held_blocks started [lora]
           (tail: None or the prompt's unread rest after its last hash, `remote_prompt.tail_wire`;
           expect_in: seconds until the expected first token, -1 for a stream, which waits for its first chunk;
           lora: the adapter's name or None, left out by releases before it: a peer's adapters hold slots too)
    FIRST  rid                 END  rid
    RESET                      STRATEGY name
    ADD    url                 REMOVE url
    SNAPSHOT blocks tails begins  (the whole index, oldest block first per backend, its pending tails
           [url, anchor, tail], and the sender's
           own requests in flight: what a replica that joined late or lost the stream starts from)
"""
from __future__ import annotations

import os
from typing import Any

import msgpack

TOPIC_PREFIX = b"kvroute.replica "

BEGIN, FIRST, END, RESET, STRATEGY, ADD, REMOVE, SNAPSHOT = range(8)
KINDS = (BEGIN, FIRST, END, RESET, STRATEGY, ADD, REMOVE, SNAPSHOT)


def new_epoch() -> str:
    """A replica's identity for this process start."""
    return os.urandom(8).hex()


def topic(epoch: str, replay_endpoint: str) -> bytes:
    return TOPIC_PREFIX + f"{epoch} {replay_endpoint}".encode()


def parse_topic(frame: bytes) -> tuple[str, str] | None:
    """(epoch, replay endpoint) of a replica's topic frame; None if it is not one."""
    if not frame.startswith(TOPIC_PREFIX):
        return None
    parts = frame[len(TOPIC_PREFIX):].decode("utf-8", "replace").split(" ")
    if len(parts) != 2 or not parts[0] or "://" not in parts[1]:
        return None
    return parts[0], parts[1]


def encode(facts: list[list[Any]]) -> bytes:
    return msgpack.packb(facts, use_bin_type=True)


def decode(payload: bytes) -> list[list[Any]]:
    """The facts of a batch; raises ValueError on anything else (the subscriber counts it undecodable)."""
    try:
        facts = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"undecodable replica batch: {e}") from e
    if not isinstance(facts, list) or not all(isinstance(f, list) and f and f[0] in KINDS for f in facts):
        raise ValueError("a replica batch must be a list of facts [kind, ...]")
    return facts
