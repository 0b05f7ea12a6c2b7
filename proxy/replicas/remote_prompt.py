"""A peer replica's lazily read prompt: what a replica needs to finish hashing it, and no more.

The router reads a prompt only as far as some backend matches it (`prompt_walk.py`) and leaves the
rest as a pending tail, hashed when a later prompt reaches its anchor block. A peer must be able to
do the same with the sender's tail, without the sender tokenizing it and without shipping the
prompt's already-hashed head again: from the sender's cut `pos` (a safe cut: tokenizing from there
gives the ids of tokenizing the whole) it gets the unread text, the token ids of the last partial
block, and the last full block's digest, from which the chain continues. A few characters before
the cut (`window`) let a later prompt be rejected cheaply, as `PromptWalker._resolve` does with a
local prompt's head.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvblocks import BlockHasher, ExtraKeys, LoraKey, extra_keys

if TYPE_CHECKING:
    from ..routing.prompt_walk import PromptState, PromptWalker

WINDOW_CHARS = 32


def _lora_wire(keys: ExtraKeys | None) -> list[str] | None:
    """The keys a tail's blocks carry: only the adapter's (a cache_salt tags block 0, never in a tail)."""
    return None if keys is None or keys.lora is None else [keys.lora.name, keys.lora.path]


def _lora_keys(wire: list[str] | None) -> ExtraKeys | None:
    return None if not wire else extra_keys(LoraKey(wire[0], wire[1]))


def tail_wire(st: PromptState, block_size: int, tail_blocks: int, anchor: int | None = None) -> list[Any] | None:
    """A local prompt's unread rest as a BEGIN/SNAPSHOT carries it, after `anchor` (default its last hash)."""
    n = len(st.hashes)
    if st.done or not n:
        return None
    at = n - 1 if anchor is None else st.hashes.index(anchor)
    return [st.text[st.pos:], _lora_wire(st.keys), st.pos, st.text[max(0, st.pos - WINDOW_CHARS):st.pos],
            st.ids[n * block_size:], st.digests[-1], tail_blocks, st.hashes[at + 1:]]


class RemotePrompt:
    """The rest of a peer's prompt after `anchor`; `hashes` grows from [anchor] to its end on `finish`."""

    __slots__ = ("rest", "keys", "pos", "window", "partial", "last_digest", "hashes", "done")

    def __init__(self, anchor: int, wire: list[Any]) -> None:
        rest, lora, pos, window, partial, last_digest, _blocks, between = wire
        self.rest: str = rest
        self.keys: ExtraKeys | None = _lora_keys(lora)
        self.pos: int = pos
        self.window: str = window
        self.partial: list[int] = partial
        self.last_digest: bytes = last_digest
        self.hashes: list[int] = [anchor, *between]
        self.done = False

    def wire(self, anchor: int, tail_blocks: int) -> list[Any] | None:
        """Passed on in a snapshot, as it came (None once hashed: its blocks are in the index then)."""
        if self.done:
            return None
        at = self.hashes.index(anchor)
        return [self.rest, _lora_wire(self.keys), self.pos, self.window, self.partial, self.last_digest, tail_blocks,
                self.hashes[at + 1:]]

    def finish(self, text: str | None, walker: PromptWalker, hasher: BlockHasher | None = None) -> bool:
        """Hash the rest if `text` (a prompt whose chain reached the anchor) may continue into it (None: hash it anyway).
        `hasher`: that prompt's (its model's) hashing; default the walker's."""
        if self.done:
            return True
        w = self.window
        if text is not None and (not text.startswith(w, self.pos - len(w)) or text[self.pos:self.pos + 1] != self.rest[:1]):
            return False
        ids = self.partial + walker.chunked.encode(self.rest)
        from_bytes = int.from_bytes
        self.hashes += [from_bytes(d[-8:], "big") for d in (hasher or walker.hasher).hashes(ids, parent=self.last_digest, keys=self.keys)]
        self.done = True
        self.rest, self.partial = "", []
        return True
