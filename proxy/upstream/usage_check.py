"""Reading `usage.prompt_tokens` out of a backend's answer without trusting it.

The proxy compares the backend's prompt-token count with its own (a tokenizer mismatch makes every
block hash differ). The answer is the backend's input to us: a count of 5,000 digits (beyond
Python's int-string limit), a negative or absurd one, is counted in kvroute_backend_bad_values_total
and logged once per backend, and never raises into the relay that is carrying the answer.
"""
from __future__ import annotations

import logging

from ..backends.registry import Backend
from ..metrics import ProxyMetrics

log = logging.getLogger("kvroute.proxy")

_KEY = b'"prompt_tokens":'
# No model has a context of a trillion tokens: more digits than this is not a count.
MAX_DIGITS = 12
# Bytes of a non-streamed answer kept to find usage in: it is the answer's last field.
TAIL_BYTES = 4096


def read_prompt_tokens(data: bytes) -> int | None | bool:
    """The last `"prompt_tokens": N` in `data`: N, None when absent, False when it is not a sane count."""
    i = data.rfind(_KEY)
    if i < 0:
        return None
    j = i + len(_KEY)
    end = len(data)
    while j < end and data[j] == 0x20:
        j += 1
    k = j
    stop = min(end, j + MAX_DIGITS + 1)
    while k < stop and 0x30 <= data[k] <= 0x39:
        k += 1
    if k == j:
        return None if j == end or data[j:j + 4] == b"null" else False
    if k - j > MAX_DIGITS:
        return False
    return int(data[j:k])


class PromptTokenCheck:
    """Counts mismatches (the tokenizer differs) and bad values (the backend is broken), each logged once."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics
        self._logged: set[tuple[str, str]] = set()

    def __call__(self, b: Backend, tokens: int, data: bytes) -> None:
        try:
            theirs = read_prompt_tokens(data)
        except Exception:  # noqa: BLE001 - a check must never end the relay carrying the answer
            theirs = False
        if theirs is None or theirs == tokens:
            return
        m = self.metrics
        if theirs is False:
            m.child(m.bad_values, b.url, "usage.prompt_tokens").inc()
            self._once(b.url, "bad", "backend %s sent a usage.prompt_tokens that is not a sane count; ignored "
                                     "(counted in kvroute_backend_bad_values_total, logged once per backend)", b.url)
            return
        m.child(m.token_mismatch, b.url).inc()
        self._once(
            b.url, "mismatch",
            "backend %s counted %d prompt tokens where the proxy counted %d: the proxy's tokenizer does not "
            "match the backend's, so its block hashes cannot match (use --tokenizer backend or the model's "
            "tokenizer folder); counted in kvroute_prompt_tokens_mismatch_total, logged once per backend",
            b.url, theirs, tokens)

    def _once(self, url: str, what: str, msg: str, *args: object) -> None:
        if (url, what) not in self._logged:
            self._logged.add((url, what))
            log.warning(msg, *args)
