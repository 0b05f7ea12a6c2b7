"""Cutting token ids into full KV blocks and hashing them as a chain.

Only full blocks are ever cached (the partial tail is recomputed), so only full blocks get hashes.
`BlockHasher` is what both the emulator and the proxy call: one definition, never copied.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

from .extra_keys import ExtraKeys
from .hashing import HASH_ALGOS, hash_block, none_hash

DEFAULT_BLOCK_SIZE = 16


def num_full_blocks(num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    return num_tokens // block_size


def full_blocks(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, ...]]:
    """The full blocks of a token sequence, in order; the partial tail is dropped."""
    n = num_full_blocks(len(token_ids), block_size)
    return [tuple(token_ids[i * block_size : (i + 1) * block_size]) for i in range(n)]


@dataclass(frozen=True)
class BlockHasher:
    """Chained block hashes for one (block size, algorithm) setting, as a vLLM server computes them.

    `keys` (`extra_keys.py`) carries a request's LoRA adapter (every block) and `cache_salt` (block 0);
    `extra_keys_block0` is the older way to give block 0's keys alone.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    algo: str = "sha256"
    _root: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algorithm {self.algo!r}; choose one of {', '.join(HASH_ALGOS)}")
        object.__setattr__(self, "_root", none_hash(self.algo))

    @property
    def root(self) -> bytes:
        """Parent digest of block 0 (vLLM's NONE_HASH)."""
        return self._root

    def hashes(
        self,
        token_ids: Sequence[int],
        parent: bytes | None = None,
        start_block: int = 0,
        extra_keys_block0: tuple[Any, ...] | None = None,
        keys: ExtraKeys | None = None,
    ) -> list[bytes]:
        """Digests of the full blocks of `token_ids` from block `start_block` on.

        `parent` must be the digest of block `start_block - 1` (None for block 0), so a caller that
        already hashed a prefix can extend the chain without rehashing it.
        """
        rest = None
        if keys is not None:
            extra_keys_block0, rest = keys.block(0), keys.block(1)
        bs = self.block_size
        n = len(token_ids) // bs
        prev = self._root if parent is None else parent
        out: list[bytes] = []
        if self.algo == "sha256":
            dumps = pickle.dumps
            append = out.append
            first = start_block
            if first == 0 and n and extra_keys_block0 is not None:
                prev = sha256(dumps((prev, tuple(token_ids[:bs]), extra_keys_block0), 5)).digest()
                append(prev)
                first = 1
            for j in range(first * bs, n * bs, bs):  # the hot loop: ~1 us a block
                prev = sha256(dumps((prev, tuple(token_ids[j : j + bs]), rest), 5)).digest()
                append(prev)
            return out
        for i in range(start_block, n):
            extra = extra_keys_block0 if i == 0 else rest
            prev = hash_block(prev, token_ids[i * bs : (i + 1) * bs], extra, self.algo)
            out.append(prev)
        return out
