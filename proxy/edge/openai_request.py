"""Parsing and validating OpenAI/vLLM request bodies at the edge, down to the routing key.

Completions route on the prompt (text, or token ids as given; for a list of prompts, the first),
chat on the WHOLE conversation rendered with `kvblocks.render_chat` - the emulator's template - so
the proxy's block hashes are the backend's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from kvblocks import APIError, ChatFormatError, render_chat


@dataclass
class ParsedRequest:
    """What routing and forwarding need from a body; the raw bytes are forwarded unchanged."""

    model: str | None
    stream: bool
    max_tokens: int | None
    text: str | None = None
    token_ids: list[int] | None = None
    cache_salt: str | None = None
    chat: bool = False
    messages: list[Any] | None = None
    multi: bool = False  # several prompts: routed on the first, usage counts them all
    user: Any = None  # the OpenAI `user` field (a session key with --session-user-field)


def _load(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _salt(body: dict[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(400, "cache_salt must be a non-empty string", "cache_salt")
    return salt


def _common(body: dict[str, Any], max_fields: tuple[str, ...]) -> tuple[str | None, bool, int | None]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    max_tokens = None
    for f in max_fields:
        v = body.get(f)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise APIError(400, f"{f} must be a positive integer", f)
        max_tokens = v
        break
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return model, stream, max_tokens


def context_error(limit: int, num_tokens: int, max_tokens: int, param: str, exact: bool = True) -> APIError:
    """vLLM's answer to a prompt + max_tokens over the context length (the same words as the backend's)."""
    some = "" if exact else "at least "
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{some}{num_tokens + max_tokens} tokens ({some}{num_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion.",
        param,
    )


def _check_count(count: int, limit_for: LimitFor | None, model: str | None, max_tokens: int | None, param: str,
                 exact: bool) -> None:
    """The context-length rule on a count known before any per-item work (ids, messages): the bound
    is checked before the work it bounds, so a 1.5M-id list costs its length, not 1.5M checks."""
    if limit_for is None:
        return
    limit = limit_for(model)
    mt = max_tokens or 0
    if count >= limit or count + mt > limit:
        raise context_error(limit, count, mt, "max_tokens" if count < limit else param, exact)


# The context length for a model (Router.max_model_len): what the cheap bounds compare against.
LimitFor = Callable[[str | None], int]


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)


def parse_completion(raw: bytes, limit_for: LimitFor | None = None) -> ParsedRequest:
    body = _load(raw)
    parsed = _parse_completion(body, limit_for)
    parsed.cache_salt = _salt(body)
    parsed.user = body.get("user")
    return parsed


def _parse_completion(body: dict[str, Any], limit_for: LimitFor | None = None) -> ParsedRequest:
    model, stream, max_tokens = _common(body, ("max_tokens",))
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        return ParsedRequest(model, stream, max_tokens, text=prompt)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            _check_count(len(prompt), limit_for, model, max_tokens, "prompt", True)
            if not _is_token_list(prompt):
                raise APIError(400, "prompt token ids must be non-negative integers", "prompt")
            return ParsedRequest(model, stream, max_tokens, token_ids=prompt)
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise APIError(400, "prompt must not be empty", "prompt")
            return ParsedRequest(model, stream, max_tokens, text=first, multi=len(prompt) > 1)
        if all(isinstance(p, list) and p for p in prompt):
            # Routing reads the first prompt: its ids are checked here (after its length); the others'
            # ids are the backend's to check, so a batch costs its count, not its total of ids.
            _check_count(len(first), limit_for, model, max_tokens, "prompt", True)
            if _is_token_list(first):
                return ParsedRequest(model, stream, max_tokens, token_ids=first, multi=len(prompt) > 1)
        raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids", "prompt")
    if isinstance(prompt, list):
        raise APIError(400, "prompt must not be empty", "prompt")
    raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids", "prompt")


def parse_chat(raw: bytes, limit_for: LimitFor | None = None) -> ParsedRequest:
    body = _load(raw)
    model, stream, max_tokens = _common(body, ("max_completion_tokens", "max_tokens"))
    if "messages" not in body:
        raise APIError(400, "messages is required", "messages")
    messages = body["messages"]
    if isinstance(messages, list):
        # Every message renders to at least one token (its role header): the count bounds the walk.
        _check_count(len(messages), limit_for, model, max_tokens, "messages", False)
        parts = sum(len(c) for m in messages if isinstance(m, dict) and isinstance(c := m.get("content"), list))
        _check_count(parts, limit_for, model, max_tokens, "messages", False)
    try:
        text = render_chat(body["messages"])
    except ChatFormatError as e:
        raise APIError(400, str(e), e.param) from None
    return ParsedRequest(model, stream, max_tokens, text=text, cache_salt=_salt(body), chat=True, messages=body["messages"],
                         user=body.get("user"))
