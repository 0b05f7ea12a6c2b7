"""A request's extra block-hash keys, as vLLM 0.32 builds them (`generate_block_hash_extra_keys`).

A LoRA request tags EVERY block with `("lora", name, path)` (`_gen_lora_extra_hash_keys`: the path
is in the key so that re-pointing a name at other weights never reuses old KV); a `cache_salt` tags
block 0 only, after the LoRA key. So an adapter's blocks and the base model's never share a hash,
nor do two adapters', even for the same text. KV events publish the same keys untagged, one entry
per block (`to_event_extra_keys`): `(name,)`, `(name, salt)` on a salted block 0, `(salt,)` without
an adapter, None for a block with no extra key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoraKey:
    """What vLLM hashes of an adapter: the name requests use and the path it was loaded from
    (`root` in its /v1/models card)."""

    name: str
    path: str

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ValueError("a LoRA key needs a non-empty name and path")

    @property
    def tagged(self) -> tuple[str, str, str]:
        return ("lora", self.name, self.path)


@dataclass(frozen=True)
class ExtraKeys:
    """Per-request extra keys; `block(i)` is what block i's hash covers, `event(i)` what events carry."""

    lora: LoraKey | None = None
    cache_salt: str | None = None

    def block(self, i: int) -> tuple[Any, ...] | None:
        keys: tuple[Any, ...] = (self.lora.tagged,) if self.lora is not None else ()
        if i == 0 and self.cache_salt:
            keys += (("cache_salt", self.cache_salt),)
        return keys or None

    def event(self, i: int) -> tuple[Any, ...] | None:
        keys: tuple[Any, ...] = (self.lora.name,) if self.lora is not None else ()
        if i == 0 and self.cache_salt:
            keys += (self.cache_salt,)
        return keys or None

    @property
    def empty(self) -> bool:
        return self.lora is None and not self.cache_salt


def extra_keys(lora: LoraKey | None = None, cache_salt: str | None = None) -> ExtraKeys | None:
    """The request's keys, or None for a plain request (the common, fastest case)."""
    keys = ExtraKeys(lora, cache_salt or None)
    return None if keys.empty else keys
