"""Parse and validate OpenAI/vLLM request bodies into dataclasses at the edge.

Everything a handler needs is checked here, so bad input becomes an `APIError` (vLLM's error JSON,
4xx) before any engine work. Unknown fields are accepted and reported, as vLLM does (extra="allow").
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from kvblocks import APIError, ChatFormatError, Tokenizer, render_chat

from .request import SamplingParams

_COMMON_FIELDS = {
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p",
    "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "prompt_logprobs", "bad_words", "add_special_tokens", "response_format",
    "structured_outputs", "priority", "request_id", "return_tokens_as_token_ids", "return_token_ids",
    "cache_salt", "kv_transfer_params", "vllm_xargs", "session_id", "stream_interval", "thinking_token_budget",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar",
}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "prompt_embeds"}
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "documents",
    "mm_processor_kwargs", "echo", "reasoning_effort", "metadata", "store", "modalities", "audio", "prediction",
    "service_tier", "function_call", "functions", "best_of",
}


@dataclass
class GenerateRequest:
    """A validated completion or chat request: one tokenized prompt per choice plus sampling params."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)
    cache_salt: str | None = None
    request_id: str | None = None
    unknown_fields: list[str] = field(default_factory=list)
    n: int = 1  # parallel samples per prompt; choice index = prompt index x n + sample index

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_N = 16384  # vLLM's VLLM_MAX_N_SEQUENCES


@dataclass
class TokenizeRequest:
    model: str
    tokens: list[int]
    return_token_strs: bool = False


@dataclass
class DetokenizeRequest:
    model: str
    tokens: list[int]


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object")
    return body


def _bad(param: str, msg: str) -> APIError:
    return APIError(400, msg, param=param)


def _opt_int(body: Mapping[str, Any], name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} must be an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise _bad(name, f"{name} must be at least {lo}, got {v}.")
    return v


def _opt_float(body: Mapping[str, Any], name: str, lo: float | None = None, hi: float | None = None) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"{name} must be a number, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _bad(name, f"{name} must be in {rng}, got {v}.")
    return float(v)


def _opt_bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be a boolean, got {type(v).__name__}")
    return v


def _opt_str(body: Mapping[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(name, f"{name} must be a string, got {type(v).__name__}")
    return v


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _logprobs_count(body: Mapping[str, Any], name: str) -> int | None:
    """An int logprobs count as vLLM validates it: >= 0 (or -1, all, which exceeds the maximum) and <= 20."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"`{name}` must be an integer.")
    if v < -1:
        raise _bad(name, f"`{name}` must be a positive value or -1.")
    if v == -1 or v > MAX_LOGPROBS:
        raise _bad(name, f"Requested sample logprobs of {v}, which is greater than max allowed: {MAX_LOGPROBS}")
    return v


def _prompt_logprobs(body: Mapping[str, Any]) -> int | None:
    v = body.get("prompt_logprobs")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad("prompt_logprobs", "`prompt_logprobs` must be an integer.")
    if body.get("stream") and (v > 0 or v == -1):
        raise _bad("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
    if v < -1:
        raise _bad("prompt_logprobs", "`prompt_logprobs` must be a positive value or -1.")
    if v == -1 or v > MAX_LOGPROBS:
        raise _bad("prompt_logprobs",
                   f"Requested prompt logprobs of {v}, which is greater than max allowed: {MAX_LOGPROBS}")
    return v


class RequestParser:
    """Validates bodies against one served model, its tokenizer and its context length."""

    def __init__(self, served_model: str, tokenizer: Tokenizer, max_model_len: int,
                 adapters: Mapping[str, Any] | None = None, aliases: tuple[str, ...] = ()) -> None:
        self.served_model = served_model
        self.aliases = frozenset(aliases)  # other names of the base model (answered as `served_model`)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.adapters = adapters if adapters is not None else {}  # LoRA adapter names also served (live view)

    def check_model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if model is None:
            return self.served_model
        if not isinstance(model, str):
            raise _bad("model", "model must be a string")
        if model in self.aliases:
            return self.served_model  # vLLM answers under the first served name
        if model != self.served_model and model not in self.adapters:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")
        return model

    def _check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        for t in ids:
            if t < 0 or t >= vocab:
                raise _bad(param, f"Token id {t} is out of vocabulary")
        return ids

    def _prompts(self, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
        if prompt is None:
            raise _bad("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif _is_int_list(prompt) and prompt:
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            items = list(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int_list(p) for p in prompt):
            items = list(prompt)
        elif isinstance(prompt, list) and not prompt:
            raise _bad("prompt", "prompt must not be empty")
        else:
            raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids")
        ids: list[list[int]] = []
        texts: list[str | None] = []
        for p in items:
            if isinstance(p, str):
                toks = self.tokenizer.encode(p)
                texts.append(p)
            else:
                toks = self._check_token_ids(list(p), "prompt")
                texts.append(None)
            if not toks:
                raise _bad("prompt", "The prompt cannot be empty.")
            ids.append(toks)
        return ids, texts

    def _sampling(self, body: Mapping[str, Any], max_tokens: int | None, prompt_lens: list[int],
                  logprobs: int | None = None, prompt_logprobs: int | None = None,
                  max_tokens_set: bool | None = None) -> SamplingParams:
        """`max_tokens_set` False: the client gave no max_tokens (`max_tokens` is a default cap), so the
        answer ends at a natural length (emulator.output_length); None: given unless `max_tokens` is None."""
        n = _opt_int(body, "n", lo=1) or 1
        if n > MAX_N:
            raise _bad("n", f"n must be at most {MAX_N}, got {n}. To increase this limit, set the "
                            "VLLM_MAX_N_SEQUENCES environment variable.")
        # best_of: vLLM 0.32 has no such sampling parameter; a completion ignores it as an unknown field,
        # chat accepts it and does nothing with it.
        if _opt_bool(body, "use_beam_search"):
            raise _bad("use_beam_search", "beam search is not supported by this emulated server")
        _opt_float(body, "temperature", lo=0.0)
        _opt_float(body, "top_p", lo=0.0, hi=1.0)
        if body.get("top_p") == 0:
            raise _bad("top_p", "top_p must be in (0, 1], got 0.")
        top_k = _opt_int(body, "top_k")
        if top_k is not None and top_k < -1:
            raise _bad("top_k", f"top_k must be -1 (disable), 0 or at least 1, got {top_k}.")
        _opt_float(body, "min_p", lo=0.0, hi=1.0)
        _opt_float(body, "presence_penalty", lo=-2.0, hi=2.0)
        _opt_float(body, "frequency_penalty", lo=-2.0, hi=2.0)
        rp = _opt_float(body, "repetition_penalty")
        if rp is not None and rp <= 0:
            raise _bad("repetition_penalty", f"repetition_penalty must be greater than zero, got {rp}.")
        seed = _opt_int(body, "seed")
        min_tokens = _opt_int(body, "min_tokens", lo=0) or 0
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise _bad("stop", "stop must be a string or a list of strings")
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and not _is_int_list(stop_ids):
            raise _bad("stop_token_ids", "stop_token_ids must be a list of integers")
        longest = max(prompt_lens)
        if longest >= self.max_model_len or (max_tokens is not None and longest + max_tokens > self.max_model_len):
            requested = longest + (max_tokens or 0)
            raise _bad(
                "max_tokens" if longest < self.max_model_len else "prompt",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{requested} tokens ({longest} in the messages, {max_tokens or 0} in the completion). "
                "Please reduce the length of the messages or completion.",
            )
        if max_tokens_set is None:
            max_tokens_set = max_tokens is not None
        if max_tokens is None:
            max_tokens = self.max_model_len - longest
        if min_tokens > max_tokens:
            raise _bad("min_tokens", f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=_opt_bool(body, "ignore_eos"),
            stop=stops,
            stop_token_ids=tuple(stop_ids or ()),
            include_stop_str_in_output=_opt_bool(body, "include_stop_str_in_output"),
            seed=seed,
            n=n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            max_tokens_set=max_tokens_set,
        )

    def _stream_flags(self, body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
        stream = _opt_bool(body, "stream")
        so = body.get("stream_options")
        if so is None:
            return stream, False, False
        if not isinstance(so, dict):
            raise _bad("stream_options", "stream_options must be an object")
        if not stream:
            raise _bad("stream_options", "Stream options can only be defined when `stream=True`.")
        return stream, _opt_bool(so, "include_usage", True), _opt_bool(so, "continuous_usage_stats")

    def _common(
        self,
        body: Mapping[str, Any],
        kind: str,
        known: set[str],
        prompts: list[list[int]],
        texts: list[str | None],
        max_tokens: int | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        max_tokens_set: bool | None = None,
    ) -> GenerateRequest:
        """The fields completions and chat share, validated once."""
        model = self.check_model(body)
        params = self._sampling(body, max_tokens, [len(p) for p in prompts], logprobs, prompt_logprobs, max_tokens_set)
        stream, include_usage, continuous = self._stream_flags(body)
        request_id = _opt_str(body, "request_id")
        return GenerateRequest(
            kind=kind,
            model=model,
            prompts=prompts,
            params=params,
            stream=stream,
            include_usage=include_usage,
            continuous_usage_stats=continuous,
            echo=_opt_bool(body, "echo"),
            prompt_texts=[t if t is not None else self.tokenizer.decode(p) for t, p in zip(texts, prompts)],
            cache_salt=_opt_str(body, "cache_salt"),
            request_id=request_id,
            unknown_fields=sorted(set(body) - known),
            n=params.n,
        )

    def completion(self, body: Mapping[str, Any]) -> GenerateRequest:
        self.check_model(body)
        if body.get("prompt_embeds") is not None:
            raise _bad("prompt_embeds", "prompt_embeds are not supported by this emulated server")
        prompts, texts = self._prompts(body.get("prompt"))
        given = _opt_int(body, "max_tokens", lo=1)
        max_tokens = 16 if given is None else given  # vLLM's completions default
        logprobs = _logprobs_count(body, "logprobs")
        prompt_logprobs = _prompt_logprobs(body)
        if prompt_logprobs is None and _opt_bool(body, "echo"):
            prompt_logprobs = logprobs  # vLLM: echo with logprobs returns the prompt's logprobs too
        return self._common(body, "completion", COMPLETION_FIELDS, prompts, texts, max_tokens, logprobs, prompt_logprobs,
                            max_tokens_set=given is not None)

    def chat(self, body: Mapping[str, Any]) -> GenerateRequest:
        self.check_model(body)
        if "messages" not in body:
            raise _bad("messages", "messages is required")
        try:
            text = render_chat(body["messages"], add_generation_prompt=_opt_bool(body, "add_generation_prompt", True))
        except ChatFormatError as e:
            raise _bad(e.param, str(e)) from None
        prompt = self.tokenizer.encode(text)
        max_tokens = _opt_int(body, "max_completion_tokens", lo=1)
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens", lo=1)
        want = _opt_bool(body, "logprobs")
        top = _logprobs_count(body, "top_logprobs")
        if top is not None and top != 0 and not want:
            raise _bad("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.")
        prompt_logprobs = _prompt_logprobs(body)
        if prompt_logprobs is None and _opt_bool(body, "echo"):
            prompt_logprobs = top or 0  # vLLM: echo asks for prompt logprobs (top_logprobs defaults to 0)
        return self._common(body, "chat", CHAT_FIELDS, [prompt], [text], max_tokens,
                            (top or 0) if want else None, prompt_logprobs)

    def tokenize(self, body: Mapping[str, Any]) -> TokenizeRequest:
        model = self.check_model(body)
        if "messages" in body:
            try:
                text = render_chat(body["messages"], add_generation_prompt=_opt_bool(body, "add_generation_prompt", True))
            except ChatFormatError as e:
                raise _bad(e.param, str(e)) from None
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise _bad("prompt", "prompt must be a string")
        return TokenizeRequest(model, self.tokenizer.encode(text), _opt_bool(body, "return_token_strs"))

    def detokenize(self, body: Mapping[str, Any]) -> DetokenizeRequest:
        model = self.check_model(body)
        tokens = body.get("tokens")
        if not _is_int_list(tokens):
            raise _bad("tokens", "tokens must be a list of integers")
        return DetokenizeRequest(model, self._check_token_ids(tokens, "tokens"))
