"""Chained block hashes byte-identical to vLLM's (v1 `kv_cache_utils.hash_block_tokens`).

A block's digest covers its parent's digest, its token ids and its extra keys, so equal digests mean
equal prefixes. `sha256` pickles the triple (vLLM's default); `sha256_cbor` uses canonical CBOR.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cbor2

HashAlgo = Literal["sha256", "sha256_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor")
NONE_HASH_SEED = "vllm-none-hash"


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


_HASH_FNS: dict[str, Callable[[Any], bytes]] = {"sha256": _sha256_pickle, "sha256_cbor": _sha256_cbor}


def hash_fn(algo: str) -> Callable[[Any], bytes]:
    """The object-to-digest function vLLM uses for `--prefix-caching-hash-algo algo`."""
    try:
        return _HASH_FNS[algo]
    except KeyError:
        raise ValueError(f"unknown hash algorithm {algo!r}; choose one of {', '.join(HASH_ALGOS)}") from None


def none_hash(algo: str = "sha256", seed: str | None = None) -> bytes:
    """Parent digest of block 0: the hash of PYTHONHASHSEED when set (even to "", as vLLM's
    resolve_none_hash_seed reads it), else of "vllm-none-hash"."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED")
        if seed is None:
            seed = NONE_HASH_SEED
    return hash_fn(algo)(seed)


def cache_salt_extra_keys(salt: str | None) -> tuple[Any, ...] | None:
    """Block 0's extra keys for a request's cache_salt, tagged as vLLM hashes them
    (kv_cache_utils.generate_block_hash_extra_keys: `(("cache_salt", salt),)`); None when unsalted."""
    return (("cache_salt", salt),) if salt else None


def hash_block(
    parent: bytes, token_ids: Sequence[int], extra_keys: tuple[Any, ...] | None = None, algo: str = "sha256"
) -> bytes:
    """Digest of one full block given its parent's digest (vLLM's `hash_block_tokens`)."""
    return hash_fn(algo)((parent, tuple(token_ids), extra_keys))


def hash_to_int(digest: bytes) -> int:
    """The int form KV events carry: the digest's last 8 bytes as a big-endian uint64."""
    return int.from_bytes(digest[-8:], "big", signed=False)
