"""Structured logging for the emulator: console or JSON lines, one line per finished request."""
from __future__ import annotations

import logging
import sys

import orjson
import structlog

from .request import EngineRequest


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """Process-wide structlog setup; called by `python -m emulator`, not by library users."""
    renderer = (
        structlog.processors.JSONRenderer(serializer=lambda obj, **kw: orjson.dumps(obj).decode())
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def request_log_fields(req: EngineRequest) -> dict[str, object]:
    """The per-request summary line: ids, token counts and emulated latencies (seconds)."""
    tm = req.timings
    return {
        "request_id": req.client_request_id,
        "prompt_tokens": req.num_prompt_tokens,
        "cached_tokens": req.num_cached_tokens,
        "output_tokens": req.num_output_tokens,
        "finish_reason": req.finish_reason,
        "preemptions": req.num_preemptions,
        "ttft_s": None if tm.ttft is None else round(tm.ttft, 6),
        "queue_s": None if tm.queue_time is None else round(tm.queue_time, 6),
        "e2e_s": None if tm.e2e is None else round(tm.e2e, 6),
    }
