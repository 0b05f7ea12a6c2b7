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


TRACE_LINE = ('a JSON object {"timestamp": ms >= 0, "input_length": int >= 1, "output_length": int >= 0, '
              '"hash_ids": [int, ...]}')


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line and what was expected."""


def read_trace(path: str | Path, offset: int = 0, limit: int | None = None) -> list[TraceRecord]:
    """Records `offset .. offset+limit` of a Mooncake JSONL trace (blank lines skipped); TraceError on
    the first malformed line, on a file without records and on an offset past its end."""
    out: list[TraceRecord] = []
    seen = 0
    for rec in _iter_lines(Path(path)):
        seen += 1
        if seen <= offset:
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(rec)
    if not seen:
        raise TraceError(f"{path}: no trace lines (expected one {TRACE_LINE} per line)")
    if not out:
        raise TraceError(f"{path}: --trace-offset {offset} is past its last line ({seen} records)")
    return out


def check_trace(path: str | Path) -> int:
    """Every line of the file parsed (TraceError on the first bad one); the number of records."""
    n = sum(1 for _ in _iter_lines(Path(path)))
    if not n:
        raise TraceError(f"{path}: no trace lines (expected one {TRACE_LINE} per line)")
    return n


def _record(d: object) -> TraceRecord:
    if not isinstance(d, dict):
        raise ValueError(f"a {type(d).__name__}, not an object")
    missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in d]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    ts, inp, outp, ids = d["timestamp"], d["input_length"], d["output_length"], d["hash_ids"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        raise ValueError(f"timestamp {ts!r} is not a number >= 0")
    for name, v, lo in (("input_length", inp, 1), ("output_length", outp, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} {v!r} is not an integer >= {lo}")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise ValueError(f"hash_ids {str(ids)[:40]} is not a list of integers")
    return TraceRecord(float(ts), inp, outp, tuple(ids))


def _iter_lines(path: Path) -> Iterator[TraceRecord]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield _record(orjson.loads(line))
            except orjson.JSONDecodeError:
                raise TraceError(f"{path}:{lineno}: not JSON (expected {TRACE_LINE})") from None
            except ValueError as e:
                raise TraceError(f"{path}:{lineno}: {e} (expected {TRACE_LINE})") from None


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
