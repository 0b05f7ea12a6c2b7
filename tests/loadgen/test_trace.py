"""Mooncake replay: equal hash ids give equal text, chained prefixes give shared tokens, lengths fit."""
import orjson

from kvblocks import get_tokenizer
from loadgen.config import WorkloadConfig
from loadgen.trace import TracePromptBuilder, TraceRecord, read_trace
from loadgen.workloads import build_workload


def _write(tmp_path, rows):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return p


def test_shared_hash_ids_give_shared_token_prefix(tmp_path):
    tok = get_tokenizer()
    b = TracePromptBuilder(seed=1)
    a, _ = b.prompt(TraceRecord(0, 1200, 10, (0, 1, 2)))
    c, _ = b.prompt(TraceRecord(0, 1100, 10, (0, 1, 7)))
    ta, tc = tok.encode(a), tok.encode(c)
    assert len(ta) == 1200 and len(tc) == 1100
    assert ta[:1024] == tc[:1024] and ta[1024:1030] != tc[1024:1030]


def test_trace_workload_arrivals_speedup_and_truncation(tmp_path):
    rows = [{"timestamp": 1000, "input_length": 600, "output_length": 20, "hash_ids": [0, 1]},
            {"timestamp": 3000, "input_length": 9000, "output_length": 100, "hash_ids": list(range(18))},
            {"timestamp": 5000, "input_length": 100, "output_length": 5, "hash_ids": [5]}]
    path = _write(tmp_path, rows)
    w = build_workload(WorkloadConfig(name="trace", trace_path=str(path), requests=2, trace_speedup=2.0))
    assert [r.arrival for r in w.requests] == [0.0, 1.0]
    assert w.requests[0].prompt_tokens == 600 and w.requests[0].max_tokens == 20
    assert w.requests[1].prompt_tokens == 4096 - 100
    assert any("truncated" in n for n in w.notes)
    assert len(read_trace(path, offset=1)) == 2


def test_bad_trace_line_is_reported(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0}\n')
    try:
        read_trace(p)
    except ValueError as e:
        assert "bad.jsonl:1" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_default_trace_ships_with_the_package_with_source_and_licence():
    from pathlib import Path

    import loadgen
    from loadgen.config import DEFAULT_TRACE

    path = Path(DEFAULT_TRACE)
    assert path.is_relative_to(Path(loadgen.__file__).parent)  # from a clone, nothing outside the repo
    assert "Apache-2.0" in (path.parent / "SOURCES.md").read_text()
    assert "Apache License" in (path.parent / "LICENSE-Apache-2.0.txt").read_text()
    w = build_workload(WorkloadConfig(name="trace", requests=5))
    assert len(w.requests) == 5 and w.requests[0].prompt_tokens > 0
