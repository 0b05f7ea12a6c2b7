"""Dummy logprobs in vLLM 0.32's response shapes (completion, chat, prompt_logprobs).

The dummy model's sampled token is its rank-1 token; alternatives are ordinary word tokens. Values
are deterministic in the token id and position, so equal requests get equal responses. What a client
parses (keys, list lengths, which entries are None) is what matters, not the numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvblocks import Tokenizer

from .generator import word_token_ids

Candidates = list[tuple[int, float]]  # (token id, logprob), the sampled (or prompt) token first


class DummyLogprobs:
    """Per-position candidate lists and their vLLM renderings."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._words = word_token_ids(tokenizer)[:64]
        self._text: dict[int, str] = {}

    def decode(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self._text[token_id] = self.tokenizer.decode([token_id])
        return t

    def candidates(self, token_id: int, position: int, num: int) -> Candidates:
        """vLLM's per-position dict: the token itself, then the top `num` (it is rank 1, so num - 1 more)."""
        lp = -0.05 - ((token_id * 31 + position) % 50) / 100.0
        out = [(token_id, lp)]
        j = (token_id + position) % len(self._words)
        while len(out) < num:
            alt = self._words[j % len(self._words)]
            j += 1
            if alt != token_id:
                out.append((alt, lp - 1.0 * len(out) - 0.25))
        return out

    # --- renderings --------------------------------------------------------------------------
    def completion(self, entries: Sequence[tuple[int, Candidates | None]], num: int, text_offset: int = 0) -> dict[str, Any]:
        """CompletionLogProbs: tokens, token_logprobs, top_logprobs (first num + 1 entries), text_offset."""
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        pos = text_offset
        for tok, cands in entries:
            text = self.decode(tok)
            offsets.append(pos)
            pos += len(text)
            tokens.append(text)
            if cands is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(cands[0][1])
            tops.append({self.decode(t): lp for i, (t, lp) in enumerate(cands) if num >= i})
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}

    def chat(self, entries: Sequence[tuple[int, Candidates]], top: int) -> dict[str, Any]:
        """ChatCompletionLogProbs: one content entry per token with its first `top` alternatives."""
        content = []
        for tok, cands in entries:
            text = self.decode(tok)
            content.append({
                "token": text,
                "logprob": cands[0][1],
                "bytes": list(text.encode("utf-8", errors="replace")),
                "top_logprobs": [
                    {"token": (s := self.decode(t)), "logprob": lp, "bytes": list(s.encode("utf-8", errors="replace"))}
                    for i, (t, lp) in enumerate(cands) if i < top
                ],
            })
        return {"content": content}

    def prompt(self, prompt_token_ids: Sequence[int], num: int) -> list[dict[str, dict[str, Any]] | None]:
        """prompt_logprobs: None for the first token, then {token id: Logprob} per prompt position."""
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for pos in range(1, len(prompt_token_ids)):
            cands = self.candidates(prompt_token_ids[pos], pos, max(num, 1))
            out.append({str(t): {"logprob": lp, "rank": i + 1, "decoded_token": self.decode(t)}
                        for i, (t, lp) in enumerate(cands)})
        return out

    def prompt_entries(self, prompt_token_ids: Sequence[int], num: int) -> list[tuple[int, Candidates | None]]:
        """The prompt as completion-logprob entries (echo): no logprob for its first token."""
        return [(t, None if pos == 0 else self.candidates(t, pos, max(num, 1))) for pos, t in enumerate(prompt_token_ids)]
