"""Rendezvous (highest-random-weight) hashing with process-independent hashes.

Proxy replicas must break ties identically, so nothing here may depend on the process: backend ids
come from blake2b of the URL (Python's `hash()` is salted per process) and weights from splitmix64.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

MASK64 = (1 << 64) - 1
# Keeps a prompt with no full block (key = its token count) away from small block-hash ints.
NO_BLOCK_SALT = 0x6B76726F75746521


def splitmix64(x: int) -> int:
    """A stable 64-bit mix (Steele et al.'s SplitMix64 finaliser): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=4096)
def backend_id(url: str) -> int:
    """A stable 64-bit id of a backend URL, the same in every process."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")


def request_key(hashes: Sequence[int], num_tokens: int) -> int:
    """The request's last known full block hash (it names the prompt as far as routing read it: lazy
    prompts stop after the first block no backend holds); the token count when none."""
    return hashes[-1] & MASK64 if hashes else splitmix64(num_tokens ^ NO_BLOCK_SALT)


def weight(key: int, url: str) -> int:
    """Rendezvous weight of backend `url` for request `key`: the highest wins, the same on every replica."""
    return splitmix64(key ^ backend_id(url))
