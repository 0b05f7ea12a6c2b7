"""benchmarks/sim_anchors: the anchors' tables from `loadgen simulate` folders, then the bulk is dropped."""
from __future__ import annotations

from benchmarks.sim_anchors import main as anchors, percentile
from loadgen.__main__ import main as loadgen
from loadgen.results import read_json


def test_percentile_is_nearest_rank():
    assert percentile([5, 1, 4, 2, 3], 90) == 5 and percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile(list(range(1, 101)), 90) == 90


def test_tables_from_a_simulated_run_and_records_dropped(tmp_path, capsys):
    out = tmp_path / "run"
    assert loadgen(["simulate", "--workload", "rag", "--requests", "16", "--rate", "8", "--documents", "2",
                    "--backends", "2", "--strategies", "round_robin,kv_aware", "--out", str(out)]) in (0, None)
    assert anchors(["mooncake", str(out), "--slo-ttft", "0.5"]) == 0
    data = read_json(out / "anchor.json")
    rr, kv = data["strategies"]["round_robin"], data["strategies"]["kv_aware"]
    assert list(data["strategies"]) == ["kv_aware", "round_robin"] and data["slo"]["ttft_s"] == 0.5
    for r in (rr, kv):
        assert r["requests"] == 16 and r["failed"] == 0
        assert r["ttft_p50"] <= r["ttft_p90"] <= r["ttft_p99"] and 0 <= r["goodput_share"] <= 1
        assert r["output_tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "| round_robin |" in printed and "1.00x | 1.00x" in printed and "24.6x" in printed
    assert not list(out.glob("*/records.jsonl")) and not list(out.glob("**/*.png"))
    assert (out / "anchor.md").is_file() and (out / "kv_aware" / "summary.json").is_file()
    # again without records: re-rendered from anchor.json, the b2b-saas table beside llm-d's figures
    assert anchors(["b2b-saas", str(out)]) == 0
    assert "precise-scheduling | 0.542" in capsys.readouterr().out
