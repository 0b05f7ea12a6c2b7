"""Response bodies and SSE chunks in vLLM's exact shapes, for completions and chat completions."""
from __future__ import annotations

from typing import Any

import orjson

from .protocol import GenerateRequest
from .request import TokenOutput


class ResponseBuilder:
    """Shapes one request's outputs; keeps per-choice token counts for usage."""

    def __init__(self, g: GenerateRequest, request_id: str, created: int, prompt_tokens_details: bool) -> None:
        self.g = g
        self.chat = g.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = created
        self.details = prompt_tokens_details
        n = len(g.prompts)
        self.prompt_tokens = [len(p) for p in g.prompts]
        self.completion_tokens = [0] * n
        self.cached_tokens = [0] * n
        self._started = [False] * n
        self._head = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": g.model,
        }

    def usage(self, choice: int | None = None) -> dict[str, Any]:
        if choice is None:
            p, c, cached = sum(self.prompt_tokens), sum(self.completion_tokens), sum(self.cached_tokens)
        else:
            p, c, cached = self.prompt_tokens[choice], self.completion_tokens[choice], self.cached_tokens[choice]
        return {
            "prompt_tokens": p,
            "total_tokens": p + c,
            "completion_tokens": c,
            "prompt_tokens_details": {"cached_tokens": cached} if self.details else None,
        }

    def _track(self, i: int, out: TokenOutput) -> None:
        self.completion_tokens[i] = out.num_output_tokens
        self.cached_tokens[i] = out.num_cached_tokens

    def stream_chunk(self, i: int, out: TokenOutput) -> bytes | None:
        """The SSE event(s) for one output; None when it carries nothing to send (held-back text)."""
        self._track(i, out)
        text = out.text
        first = not self._started[i]
        if not text and out.finish_reason is None and not (first and self.chat):
            return None
        self._started[i] = True
        prefix = b""
        if self.chat:
            if first:
                role = {**self._head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]}
                prefix = b"data: " + orjson.dumps(role) + b"\n\n"
                if not text and out.finish_reason is None:
                    return prefix
            choice: dict[str, Any] = {"index": i, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
        else:
            if first and self.g.echo:
                text = self.g.prompt_texts[i] + text
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason}
        chunk: dict[str, Any] = {**self._head, "choices": [choice]}
        if self.g.continuous_usage_stats:
            chunk["usage"] = self.usage(i)
        return prefix + b"data: " + orjson.dumps(chunk) + b"\n\n"

    def usage_chunk(self) -> bytes:
        return b"data: " + orjson.dumps({**self._head, "choices": [], "usage": self.usage()}) + b"\n\n"

    def full_response(self, results: list[list[TokenOutput]]) -> dict[str, Any]:
        """The non-streaming body: one choice per prompt with its whole text."""
        choices = []
        for i, outs in enumerate(results):
            last = outs[-1]
            self._track(i, last)
            text = "".join(o.text for o in outs)
            if self.chat:
                choices.append({
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
                    "logprobs": None,
                    "finish_reason": last.finish_reason,
                    "stop_reason": last.stop_reason,
                })
            else:
                if self.g.echo:
                    text = self.g.prompt_texts[i] + text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": last.finish_reason,
                                "stop_reason": last.stop_reason, "prompt_logprobs": None})
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.g.model,
            "choices": choices,
            "usage": self.usage(),
            **({"prompt_logprobs": None} if self.chat else {}),
        }
