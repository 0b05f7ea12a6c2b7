"""Response bodies and SSE chunks in vLLM 0.32's shapes, for completions and chat completions.

Choices: one per (prompt, sample) pair, index = prompt index x n + sample index. Usage counts each
prompt once and every sample's tokens. Cached tokens follow vLLM's serving code: a non-streamed
response reports its last prompt's (for n > 1, its last sample's), a stream reports the first
output's. Non-streamed bodies carry every field vLLM's `model_dump()` writes (None included); the
stream's final usage chunk drops None fields (`exclude_none`).
"""
from __future__ import annotations

from typing import Any

import orjson

from .logprobs import Candidates, DummyLogprobs
from .protocol import GenerateRequest
from .request import TokenOutput


class ResponseBuilder:
    """Shapes one request's outputs; keeps per-choice token counts for usage."""

    def __init__(self, g: GenerateRequest, request_id: str, created: int, prompt_tokens_details: bool,
                 logprobs: DummyLogprobs | None = None, block_size: int = 16, fingerprint: str | None = None) -> None:
        self.g = g
        self.chat = g.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = created
        self.details = prompt_tokens_details
        self.lp = logprobs
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.n = g.n
        k = g.num_choices
        self.prompt_tokens = [len(p) for p in g.prompts]
        self.completion_tokens = [0] * k
        self.cached_tokens = [0] * k
        self._started = [False] * k
        self._roles_sent = False
        self._first: tuple[int, int] | None = None  # (choice, cached tokens) of the first output streamed
        self._pending: list[list[int]] = [[] for _ in range(k)]  # token ids not yet sent (held-back text)
        self._text_offset = [0] * k
        self._head = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": g.model,
        }

    def prompt_of(self, choice: int) -> list[int]:
        return self.g.prompts[choice // self.n]

    # --- usage -------------------------------------------------------------------------------
    def _details(self, choice: int, cached: int, drop_none: bool) -> dict[str, Any] | None:
        if not self.details:
            return None
        d: dict[str, Any] = {"cached_tokens": cached, "created_cache_tokens": None, "multimodal_tokens": None}
        if self.chat:
            # vLLM's PrefillStats: full prompt blocks now cached by this request minus those it hit.
            d["created_cache_tokens"] = max(0, len(self.prompt_of(choice)) // self.block_size * self.block_size - cached)
        if drop_none:
            d = {k: v for k, v in d.items() if v is not None}
        return d

    def _reporting_choice(self, streamed: bool) -> tuple[int, int]:
        if streamed and self._first is not None:
            return self._first
        last = self.g.num_choices - 1  # the last prompt's last sample
        return last, self.cached_tokens[last]

    def usage(self, streamed: bool) -> dict[str, Any]:
        p, c = sum(self.prompt_tokens), sum(self.completion_tokens)
        choice, cached = self._reporting_choice(streamed)
        details = self._details(choice, cached, drop_none=streamed)
        u: dict[str, Any] = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
        if streamed:
            if details is not None:
                u["prompt_tokens_details"] = details
        else:
            u["prompt_tokens_details"] = details
            u["completion_tokens_details"] = None
        return u

    def _continuous_usage(self, i: int) -> dict[str, Any]:
        p, c = len(self.prompt_of(i)), self.completion_tokens[i]
        u: dict[str, Any] = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
        if self.chat:
            u["completion_tokens_details"] = None
        return u

    # --- logprobs ----------------------------------------------------------------------------
    def _entries(self, i: int, token_ids: list[int], first_pos: int) -> list[tuple[int, Candidates]]:
        num = self.g.params.logprobs or 0
        base = len(self.prompt_of(i))
        return [(t, self.lp.candidates(t, base + first_pos + k, num)) for k, t in enumerate(token_ids)]

    def _logprobs(self, i: int, token_ids: list[int], first_pos: int, echo_prompt: bool) -> dict[str, Any] | None:
        if self.g.params.logprobs is None or self.lp is None:
            return None
        num = self.g.params.logprobs
        entries = self._entries(i, token_ids, first_pos)
        if self.chat:
            return self.lp.chat(entries, num)
        if echo_prompt:
            entries = self.lp.prompt_entries(self.prompt_of(i), num) + entries
        out = self.lp.completion(entries, num, self._text_offset[i])
        if out["tokens"]:
            self._text_offset[i] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def _prompt_logprobs(self, i: int) -> list | None:
        pl = self.g.params.prompt_logprobs
        if pl is None or self.lp is None:
            return None
        return self.lp.prompt(self.prompt_of(i), pl)

    # --- streaming ---------------------------------------------------------------------------
    def _track(self, i: int, out: TokenOutput) -> None:
        self.completion_tokens[i] = out.num_output_tokens
        self.cached_tokens[i] = out.num_cached_tokens
        if self._first is None:
            self._first = (i, out.num_cached_tokens)

    def stream_chunk(self, i: int, out: TokenOutput) -> bytes | None:
        """The SSE event(s) for one output. Like vLLM, every token gets a chunk, with "" as its text
        while a possible stop string holds the text back; a chat stream opens with one role chunk
        per choice. Keys follow vLLM's `exclude_unset` dumps (a chat chunk has stop_reason only
        when it finishes)."""
        self._track(i, out)
        if out.token_id is not None:
            self._pending[i].append(out.token_id)
        elif not out.text and out.finish_reason is None:
            return None
        text = out.text
        first = not self._started[i]
        self._started[i] = True
        prefix = b""
        if self.chat and not self._roles_sent:
            self._roles_sent = True
            for k in range(self.g.num_choices):
                role = {**self._head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}],
                        "prompt_token_ids": None, "prompt_text": None}
                prefix += b"data: " + orjson.dumps(role) + b"\n\n"
        toks, self._pending[i] = self._pending[i], []
        logprobs = self._logprobs(i, toks, out.num_output_tokens - len(toks), echo_prompt=first and self.g.echo)
        if self.chat:
            choice: dict[str, Any] = {"index": i, "delta": {"content": text}, "logprobs": logprobs,
                                      "finish_reason": out.finish_reason}
            if out.finish_reason is not None:
                choice["stop_reason"] = out.stop_reason
            choice["token_ids"] = None
        else:
            if first and self.g.echo:
                text = self.g.prompt_texts[i // self.n] + text
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason, "prompt_token_ids": None, "token_ids": None}
        chunk: dict[str, Any] = {**self._head, "choices": [choice]}
        if out.finish_reason is not None and not self.g.include_usage and self.fingerprint is not None:
            chunk["system_fingerprint"] = self.fingerprint  # vLLM stamps the terminal chunk if no usage chunk follows
        if self.g.continuous_usage_stats:
            chunk["usage"] = self._continuous_usage(i)
        return prefix + b"data: " + orjson.dumps(chunk) + b"\n\n"

    def usage_chunk(self) -> bytes:
        body: dict[str, Any] = {**self._head, "choices": [], "usage": self.usage(streamed=True)}
        if self.fingerprint is not None:
            body["system_fingerprint"] = self.fingerprint
        return b"data: " + orjson.dumps(body) + b"\n\n"

    # --- whole responses ---------------------------------------------------------------------
    def full_response(self, results: list[list[TokenOutput]]) -> dict[str, Any]:
        """The non-streaming body: one choice per (prompt, sample) with its whole text."""
        choices = []
        for i, outs in enumerate(results):
            last = outs[-1]
            self.completion_tokens[i] = last.num_output_tokens
            self.cached_tokens[i] = last.num_cached_tokens
            text = "".join(o.text for o in outs)
            toks = [o.token_id for o in outs if o.token_id is not None]
            if self.chat:
                choices.append({
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                "audio": None, "function_call": None, "reasoning": None},
                    "logprobs": self._logprobs(i, toks, 0, echo_prompt=False),
                    "finish_reason": last.finish_reason,
                    "stop_reason": last.stop_reason,
                })
            else:
                logprobs = self._logprobs(i, toks, 0, echo_prompt=self.g.echo)
                if self.g.echo:
                    text = self.g.prompt_texts[i // self.n] + text
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason,
                                "stop_reason": last.stop_reason, "prompt_logprobs": self._prompt_logprobs(i)})
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.g.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": self.usage(streamed=False),
        }
        if self.chat:
            body["prompt_logprobs"] = self._prompt_logprobs(0)
            body["prompt_token_ids"] = None
            body["prompt_text"] = None
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return body
