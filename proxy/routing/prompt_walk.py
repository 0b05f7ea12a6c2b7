"""Tokenizing and hashing a prompt only as far as routing needs it (lazy prompts).

Block hashes are chained, so no backend can match a prompt past the first block none of them
holds. The walker tokenizes text chunk by chunk (cut where the tokenization cannot change,
`tokenize_cache.py`; the first chunk is small) and hashes the chunk's full blocks, and stops after
the chunk in which every backend stopped matching. The rest stays text: the chosen backend is
recorded as holding the known blocks plus a pending tail (`prefix_index.py`) that is tokenized only
when a later prompt's chain reaches the tail's anchor block on that backend. A prompt nobody shares
costs one small chunk instead of its full length; a shared one is still tokenized exactly once.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvblocks import BlockHasher, ExtraKeys

from ..index.prefix_index import PendingTail, PrefixIndex
from .tokenize_cache import ChunkedTokenizer

# Text prefixes (shared documents, chat histories) whose block hashes are kept for reuse.
PREFIX_HASH_ENTRIES = 4096


@dataclass(eq=False)
class PromptState:
    """A prompt tokenized and hashed up to `pos`; `hashes` are int forms, `digests` the chain's bytes.
    `keys`: its extra hash keys (LoRA adapter, cache_salt), None for a plain base-model prompt;
    `hasher`: its model's block hashing (None: the walker's)."""

    text: str
    keys: ExtraKeys | None = None
    hasher: BlockHasher | None = None
    pos: int = 0  # text[:pos] is tokenized
    chain: int = 0  # chunk-cache id naming text[:pos] (0: no cached prefix)
    chunks: int = 0  # chunks taken so far (sets the next chunk's size)
    ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether the whole text is tokenized."""
        return self.pos >= len(self.text)

    def estimated_tokens(self) -> int:
        """Exact once done; before that the known tokens plus the rest at the known part's chars per token."""
        n = len(self.ids)
        if self.done:
            return n
        rest = len(self.text) - self.pos
        return n + (rest * n + self.pos - 1) // self.pos if n else n + rest // 4 + 1


class PromptWalker:
    """Advances `PromptState`s over one chunked tokenizer, block hasher and prefix index (a router's).

    Keeps the block hashes of up to PREFIX_HASH_ENTRIES text prefixes (LRU) so a shared document is
    hashed once (per hashing and extra keys); `set_hasher` voids them."""

    def __init__(self, chunked: ChunkedTokenizer, index: PrefixIndex, hasher: BlockHasher) -> None:
        self.chunked = chunked
        self.index = index
        self.hasher = hasher
        self._prefix_hashes: OrderedDict[tuple[BlockHasher, ExtraKeys | None, int], tuple[int, list[int], list[bytes]]] = OrderedDict()

    def set_hasher(self, hasher: BlockHasher) -> None:
        """Hash with `hasher` from now on (the backends' block size or algorithm changed): cached prefix
        hashes are void."""
        self.hasher = hasher
        self._prefix_hashes.clear()

    def advance(self, st: PromptState) -> None:
        """Tokenize one more chunk and hash the full blocks it completes (reusing a cached prefix's hashes)."""
        ids, st.pos, prefix_id = self.chunked.next_chunk(st.text, st.pos, st.chain, st.chunks)
        st.chunks += 1
        st.ids += ids
        hasher = st.hasher or self.hasher
        n_blocks = len(st.ids) // hasher.block_size
        cache = self._prefix_hashes
        if prefix_id is not None:
            st.chain = prefix_id
            key = (hasher, st.keys, prefix_id)
            hit = cache.get(key)
            if hit is not None and hit[0] == n_blocks:
                cache.move_to_end(key)
                done = len(st.hashes)
                st.hashes += hit[1][done:n_blocks]
                st.digests += hit[2][done:n_blocks]
                return
        done = len(st.hashes)
        if n_blocks > done:
            parent = st.digests[-1] if done else None
            new = hasher.hashes(st.ids, parent=parent, start_block=done, keys=st.keys)
            st.digests += new
            from_bytes = int.from_bytes
            st.hashes += [from_bytes(d[-8:], "big") for d in new]
        if prefix_id is not None:
            # The lists only ever grow, so sharing them is safe: an entry says how many blocks it covers.
            cache[(hasher, st.keys, prefix_id)] = (n_blocks, st.hashes, st.digests)
            if len(cache) > PREFIX_HASH_ENTRIES:
                cache.popitem(last=False)

    def finish(self, st: PromptState, stop_at: int | None = None) -> None:
        """Tokenize to the end, or only until `stop_at` tokens are known (a prompt already too long)."""
        while not st.done and (stop_at is None or len(st.ids) < stop_at):
            self.advance(st)

    def walk(self, st: PromptState) -> dict:
        """Advance until no backend can match further or the text ends, resolving pending tails met on
        the way; returns the matches (backend -> leading blocks it holds), found on the way too."""
        index = self.index
        owners = index.owner_map().get
        pending = index.pending_map()
        matches: dict = {}
        mask = -1
        i = 0
        while not st.done:
            self.advance(st)
            hashes = st.hashes
            n = len(hashes)
            while i < n:
                h = hashes[i]
                m = mask & owners(h, 0)
                if m != mask:
                    if i:
                        index.emit(matches, mask & ~m, i)
                    mask = m
                    if not mask:
                        return matches
                if pending:
                    tails = pending.get(h)
                    if tails:
                        self._resolve(tails, mask, st)
                i += 1
        if mask != -1:
            index.emit(matches, mask, i)
        return matches

    def _resolve(self, tails: list[PendingTail], mask: int, st: PromptState) -> None:
        """Hash the pending tails this prompt may continue into (text check first: it is exact and cheap)."""
        index = self.index
        for p in list(tails):
            if not (mask >> p.slot) & 1:
                continue
            other: PromptState = p.prompt
            # Both chains agree up to the anchor; the next block holds the other's token at its cut
            # (`pos`), so unless this text agrees up to and including that character it cannot match.
            # (A prompt already finished, e.g. for another policy, costs nothing to resolve.)
            if type(other) is not PromptState:  # a peer replica's prompt (proxy/replicas/remote_prompt.py)
                if not other.finish(st.text, self, st.hasher):
                    continue
            elif not other.done:
                if not st.text.startswith(other.text[: other.pos + 1]):
                    continue
                self.finish(other)
            if other.hashes:
                index.mark_prompt_end(other.hashes[-1])
            index.resolve(p, other.hashes[other.hashes.index(p.anchor) + 1 :])

    def tail_blocks(self, st: PromptState) -> int:
        """Estimated full blocks after the known ones (what a pending tail occupies on its backend)."""
        return max(0, st.estimated_tokens() // (st.hasher or self.hasher).block_size - len(st.hashes))
