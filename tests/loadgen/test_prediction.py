"""Prediction accuracy (the router's matched blocks against the cached tokens the backend reported)
is in every summary and report."""
from __future__ import annotations

from loadgen.client import RequestRecord
from loadgen.report import prediction_line
from loadgen.summary import prediction


def _rec(i: int, prompt: int, cached: int, matched: int | None) -> RequestRecord:
    return RequestRecord(i, i, 0, "completions", 0.0, ok=True, prompt_tokens=prompt, cached_tokens=cached,
                         matched_blocks=matched)


def test_prediction_counts_over_and_under_predicted_blocks():
    recs = [
        _rec(0, 320, 320 - 16, 20),  # predicted 20 capped to 19 (the last token is computed), 19 cached: exact
        _rec(1, 320, 160, 19),  # 19 predicted, 10 cached: over
        _rec(2, 320, 160, 0),  # 0 predicted, 10 cached (another client warmed it): under
        _rec(3, 320, 0, None),  # no header: not judged
    ]
    p = prediction(recs)
    assert p["requests"] == 3 and p["predicted_blocks"] == 38 and p["confirmed_blocks"] == 29
    assert p["accuracy"] == 29 / 38
    assert (p["exact_requests"], p["over_requests"], p["under_requests"]) == (1, 1, 1)
    line = prediction_line({"prediction": p})[0]
    assert "76.3%" in line and "1 over-predicted" in line
    assert prediction([recs[3]]) is None
    assert "–" in prediction_line({"prediction": None})[0]
