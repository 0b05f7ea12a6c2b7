"""The emulator's per-request log line; the logging stack itself is the shared one (kvblocks.logs)."""
from __future__ import annotations

from kvblocks.logs import configure_logging

from .request import EngineRequest

__all__ = ["configure_logging", "request_log_fields"]


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
