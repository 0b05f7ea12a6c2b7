"""`python -m benchmarks.seed_spread` on a real (small) simulated sweep with three seeds."""
import statistics
import subprocess
import sys
from pathlib import Path

import orjson

from benchmarks.seed_spread import main

ROOT = Path(__file__).resolve().parents[2]


def test_seed_spread_reads_a_sweeps_seeds(tmp_path, capsys):
    out = tmp_path / "sysprompt-2"
    cmd = [sys.executable, "-m", "loadgen", "simulate", "--sweep", "--workload", "sysprompt", "--requests", "24",
           "--rates", "4,8", "--seeds", "0,1,2", "--strategies", "kv_aware", "--backends", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(out)]) == 0
    printed = capsys.readouterr().out
    for rate in (4, 8):
        runs = [orjson.loads((out / "kv_aware" / f"rate-{rate}" / f"seed-{s}" / "summary.json").read_bytes())
                for s in range(3)]
        p99 = [r["latency_emulated"]["ttft"]["p99"] for r in runs]
        rsd = statistics.stdev(p99) / statistics.fmean(p99)
        hit_sd = statistics.stdev(r["hit_rate"] for r in runs) * 100
        row = next(line for line in printed.splitlines() if line.startswith(f"| sysprompt-2 | {rate} | 3 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{rsd * 100:.0f}% / {rsd / 3 ** 0.5 * 100:.1f}%"
        assert cells[6] == f"{hit_sd:.1f} pt"
    assert "of 6 figures" in printed


def test_seed_spread_bad_folder_exits_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["/nonexistent-sweep"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folders" in err[0]
