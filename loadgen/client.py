"""Sending one request with the real `openai` AsyncOpenAI client (streaming) and timing it.

The raw streaming response gives the proxy's routing headers; the stream gives the time to the
first token and the final usage chunk (prompt, cached and completion tokens). Every outcome,
success or failure, becomes one `RequestRecord`: failures are counted, never dropped.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from .workloads import RequestSpec

HEADER_BACKEND = "x-kvroute-backend"
HEADER_STRATEGY = "x-kvroute-strategy"
HEADER_MATCHED = "x-kvroute-matched-blocks"
HEADER_REQUEST_ID = "x-request-id"


@dataclass
class RequestRecord:
    """What was measured for one request (times in wall-clock seconds; `start` from the run's start)."""

    index: int
    chain: int
    turn: int
    api: str
    start: float
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    expected_prompt_tokens: int = 0
    max_tokens: int = 0
    finish_reason: str = ""
    backend: str = ""
    strategy: str = ""
    matched_blocks: int | None = None
    request_id: str = ""
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def hit(self) -> bool:
        """A request counts as a cache HIT when any of its prompt tokens came from the prefix cache."""
        return self.cached_tokens > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_client(base_url: str, api_key: str = "EMPTY", timeout: float = 300.0) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client that never retries, so each failure is seen and counted once."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)


def _chunk_text(chunk: Any) -> str:
    choices = getattr(chunk, "choices", None) or []
    if not choices:
        return ""
    c = choices[0]
    delta = getattr(c, "delta", None)
    if delta is not None:
        return getattr(delta, "content", None) or ""
    return getattr(c, "text", None) or ""


async def send_request(client: openai.AsyncOpenAI, model: str, spec: RequestSpec, run_start: float) -> RequestRecord:
    """Send `spec` streaming, return its record; never raises for request failures (cancellation passes)."""
    rec = RequestRecord(spec.index, spec.chain, spec.turn, spec.api, time.perf_counter() - run_start,
                        expected_prompt_tokens=spec.prompt_tokens, max_tokens=spec.max_tokens, tags=dict(spec.tags))
    extra = {"ignore_eos": True, "min_tokens": spec.max_tokens}
    kwargs: dict[str, Any] = dict(model=spec.model or model, max_tokens=spec.max_tokens, stream=True,
                                  stream_options={"include_usage": True}, temperature=0.0, extra_body=extra,
                                  extra_headers={HEADER_REQUEST_ID: f"loadgen-{spec.index}"})
    t0 = time.perf_counter()
    first: float | None = None
    first_any: float | None = None
    usage = None
    try:
        if spec.api == "chat":
            ctx = client.chat.completions.with_streaming_response.create(messages=spec.messages, **kwargs)
        else:
            ctx = client.completions.with_streaming_response.create(prompt=spec.prompt, **kwargs)
        async with ctx as resp:
            rec.status = resp.status_code
            h = resp.headers
            rec.backend = h.get(HEADER_BACKEND, "")
            rec.strategy = h.get(HEADER_STRATEGY, "")
            rec.request_id = h.get(HEADER_REQUEST_ID, "")
            mb = h.get(HEADER_MATCHED)
            rec.matched_blocks = int(mb) if mb not in (None, "") and mb.lstrip("-").isdigit() else None
            stream = await resp.parse()
            async for chunk in stream:
                now = time.perf_counter()
                if getattr(chunk, "choices", None):
                    if first_any is None:
                        first_any = now
                    if first is None and _chunk_text(chunk):
                        first = now
                    reason = getattr(chunk.choices[0], "finish_reason", None)
                    if reason:
                        rec.finish_reason = reason
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
        end = time.perf_counter()
    except asyncio.CancelledError:
        raise
    except openai.APIStatusError as e:
        rec.status = e.status_code
        rec.error = f"{type(e).__name__}: {_short(e.message)}"
        return rec
    except openai.APIConnectionError as e:  # also APITimeoutError: say which URL, or five identical lines say nothing
        rec.error = f"{type(e).__name__}: {_short(str(e))} ({client.base_url})"
        return rec
    except openai.APIError as e:
        rec.error = f"{type(e).__name__}: {_short(str(e))}"
        return rec
    except Exception as e:  # a broken stream or body must become a counted failure, not a crash
        rec.error = f"{type(e).__name__}: {_short(str(e))}"
        return rec
    rec.e2e = end - t0
    first = first if first is not None else first_any
    rec.ttft = (first - t0) if first is not None else None
    if usage is not None:
        rec.prompt_tokens = usage.prompt_tokens or 0
        rec.completion_tokens = usage.completion_tokens or 0
        details = getattr(usage, "prompt_tokens_details", None)
        rec.cached_tokens = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    if rec.ttft is not None and rec.completion_tokens > 1:
        rec.tpot = (rec.e2e - rec.ttft) / (rec.completion_tokens - 1)
    rec.ok = usage is not None
    if not rec.ok:
        rec.error = "stream ended without a usage chunk"
    return rec


def _short(msg: str, limit: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
