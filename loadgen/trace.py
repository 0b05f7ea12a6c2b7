"""Mooncake-format request traces: loading, and turning hash ids into real prompt text.

A trace line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}` with
one id per 512-token block. Ids are chained (an id at position i implies the whole prefix 0..i), so
mapping each id to a fixed 512-token text reproduces the trace's sharing exactly: equal id lists
give equal prompts, and a shared leading run of ids gives a shared token prefix.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from .text import seeded_words

TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRecord:
    """One request of the trace, as written in the file."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_trace(path: str | Path, offset: int = 0, limit: int | None = None) -> list[TraceRecord]:
    """Records `offset .. offset+limit` of a Mooncake JSONL trace (blank lines skipped)."""
    out: list[TraceRecord] = []
    for i, rec in enumerate(_iter_lines(Path(path))):
        if i < offset:
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(rec)
    return out


def _iter_lines(path: Path) -> Iterator[TraceRecord]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = orjson.loads(line)
                yield TraceRecord(
                    float(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                    tuple(int(h) for h in d["hash_ids"]),
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace line ({e})") from e


class TracePromptBuilder:
    """Prompt text for trace records; one 512-token text per hash id, cached."""

    def __init__(self, seed: int = 0, block_tokens: int = TRACE_BLOCK_TOKENS) -> None:
        self.seed = seed
        self.block_tokens = block_tokens
        self._blocks: dict[int, str] = {}

    def block_text(self, hash_id: int) -> str:
        text = self._blocks.get(hash_id)
        if text is None:
            text = self._blocks[hash_id] = seeded_words(self.block_tokens, self.seed, "trace-block", hash_id)
        return text

    def prompt(self, record: TraceRecord, max_tokens: int | None = None) -> tuple[str, int]:
        """The prompt text and its token count: the record's blocks, cut to its input length and to `max_tokens`."""
        n = record.input_length if max_tokens is None else min(record.input_length, max_tokens)
        parts: list[str] = []
        remaining = n
        for hid in record.hash_ids:
            if remaining <= 0:
                break
            text = self.block_text(hid)
            if remaining < self.block_tokens:
                # Every word is one token with a leading space: cut at the remaining-th word.
                text = " ".join(text.split(" ")[: remaining + 1])
            parts.append(text)
            remaining -= self.block_tokens
        # A record whose hash ids cover fewer tokens than its input length is padded with record-unique words.
        if remaining > 0:
            parts.append(seeded_words(remaining, self.seed, "trace-tail", record.hash_ids, record.input_length))
        return "".join(parts), n
