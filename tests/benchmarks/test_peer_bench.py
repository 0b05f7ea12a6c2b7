"""benchmarks.peer_bench: the ratios it prints, its flags, and one small real run (stubs + kvroute).

The peer routers themselves need their venv (built by tools/peer_env.sh from the registry), so the
real run here is `--no-peers`: the same stubs, load and accounting, kvroute alone.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.peer_bench import report

ROOT = Path(__file__).resolve().parents[2]
ENV = {"rounds": 2, "n_cpu": 10, "n_thrpt": 10, "ncpu": 2, "nice": 0, "load_before": "0 0 0", "load_after": "0 0 0"}


def rec(rnd: int, cpu: float, rps: float, sys_us: float = 10.0) -> dict:
    return {"round": rnd, "ok": 10, "err": 0, "rps": rps, "cpu_us": [cpu, 50.0], "sys_us": [sys_us, 5.0],
            "other_cores": 0.25}


def row(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_are_paired_per_round_then_the_median():
    results = {
        "sglang-rr": {"cpu32": [rec(0, 100, 0), rec(1, 200, 0)], "c64": [rec(0, 0, 1000), rec(1, 0, 500)],
                      "c128": [rec(0, 0, 1000), rec(1, 0, 1000)]},
        # Round 1 ran slower for everyone: per round kvroute is 2x and 1.5x, 0.5x and 1x.
        "kvroute": {"cpu32": [rec(0, 200, 0, 20), rec(1, 300, 0, 30)], "c64": [rec(0, 0, 500), rec(1, 0, 500)],
                    "c128": [rec(0, 0, 900), rec(1, 0, 1100)]},
    }
    cells = row(report(results, ["sglang-rr", "kvroute", "vllm-rr"], ENV), "kvroute")
    assert cells[1] == "250 (200-300)" and cells[2] == "1.75 (1.50-2.00)" and cells[3] == "10%"
    assert cells[4] == "500 (500-500)" and cells[5] == "0.75 (0.50-1.00)"
    assert cells[7] == "1.00 (0.90-1.10)" and cells[8] == "0"
    assert row(report(results, ["sglang-rr", "kvroute", "vllm-rr"], ENV), "vllm-rr")[1] == "did not start"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.peer_bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_bad_count_is_one_line_naming_the_flag():
    p = run("--rounds", "0", "--no-peers")
    assert p.returncode == 2 and p.stderr.strip().endswith("--rounds must be >= 1") and "Traceback" not in p.stderr


def test_a_small_real_run_measures_kvroute_over_the_stubs():
    p = run("--no-peers", "--rounds", "1", "--n-cpu", "60", "--n-thrpt", "60", "--warmup", "10", "--max-seconds", "30")
    assert p.returncode == 0, p.stderr[-2000:]
    cells = row(p.stdout, "kvroute")
    assert float(cells[1].split()[0]) > 0 and cells[8] == "0"  # CPU measured, every request answered
    assert "sglang-router round_robin did not run: no ratios" in p.stdout
