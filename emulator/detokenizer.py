"""Incremental output text with vLLM's stop-string rules.

A stop string ends the request (finish_reason "stop", stop_reason = the string) and is cut from the
text unless include_stop_str_in_output; while streaming, the last len(longest stop)-1 characters are
held back so a stop string split across tokens never leaks out.
"""
from __future__ import annotations

from collections.abc import Sequence


class OutputText:
    """The text generated so far, what of it has been sent, and stop-string detection."""

    __slots__ = ("text", "_sent", "_stop", "_include", "_hold", "_max_stop")

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.text = ""
        self._sent = 0
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._hold = self._max_stop - 1 if self._stop and not include_stop_str_in_output else 0

    def append(self, piece: str, check_stop: bool = True) -> str | None:
        """Add a token's text; return the stop string it completed (the text is then final).

        `check_stop` is False before min_tokens, when vLLM does not look for stop strings yet.
        """
        prev = len(self.text)
        self.text += piece
        if not self._stop or not piece or not check_stop:
            return None
        start = max(0, prev - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self._include else self.text[:i]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet sent, minus the held-back tail unless the request has finished."""
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._hold)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
