"""The CLI as a user runs it: `run` stopped by Ctrl-C keeps what it measured; `compare` starts its own proxy."""
import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import orjson

from loadgen.proxy_admin import ProxyAdmin

ROOT = Path(__file__).resolve().parents[2]


async def _processed(target: str) -> int:
    admin = ProxyAdmin(target)
    body = await admin._call("GET", "/admin/backends")
    return sum(b["processed"] for b in body["backends"])


async def test_ctrl_c_stops_cleanly_and_keeps_records(stack, tmp_path):
    cmd = [sys.executable, "-m", "loadgen", "run", "--workload", "rag", "--target", stack, "--requests", "60",
           "--concurrency", "2", "--output-tokens", "400", "--documents", "3", "--doc-tokens-min", "200",
           "--doc-tokens-max", "300", "--time-scale", "0.02", "--out", str(tmp_path), "--no-progress"]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    # With 2 in flight, a third routed request means one has finished; poll for it, bounded by the deadline.
    while await _processed(stack) < 3 and loop.time() < deadline and proc.returncode is None:
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, err.decode()[-2000:]
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["interrupted"] and summary["cancelled"] >= 1 and summary["ok"] >= 1
    assert summary["requests_sent"] < 60
    lines = (tmp_path / "records.jsonl").read_bytes().splitlines()
    assert len(lines) == summary["requests_sent"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "latency_distribution.png").exists()


async def test_compare_cli_starts_its_own_proxy(tmp_path):
    cmd = [sys.executable, "-m", "loadgen", "compare", "--workload", "sysprompt", "--strategies",
           "default,round_robin", "--requests", "6", "--concurrency", "2", "--output-tokens", "8",
           "--system-tokens", "200", "--time-scale", "0.02", "--backends", "2", "--out", str(tmp_path),
           "--no-progress"]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert list(summary)[1] == "round_robin" and all(s["ok"] == 6 for s in summary.values())
    assert b"| round_robin |" in out
    assert "--time-scale 0.02" in (tmp_path / "report.md").read_text()


async def test_ctrl_c_during_compare_keeps_the_finished_part(tmp_path):
    """Ctrl-C at a terminal signals the whole process group; the started proxy runs in its own session."""
    cmd = [sys.executable, "-m", "loadgen", "compare", "--workload", "rag", "--strategies", "default,round_robin",
           "--requests", "40", "--concurrency", "2", "--output-tokens", "400", "--documents", "3",
           "--doc-tokens-min", "200", "--doc-tokens-max", "300", "--time-scale", "0.02", "--backends", "2",
           "--out", str(tmp_path)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, start_new_session=True)
    seen = b""
    while not re.search(rb"\| *[1-9]\d*/40", seen):
        chunk = await asyncio.wait_for(proc.stderr.read(4096), 60)  # the progress bar shows requests done
        assert chunk, seen.decode()[-2000:]
        seen += chunk
    os.killpg(proc.pid, signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, (seen + err).decode()[-2000:]
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert len(summary) == 1
    only = next(iter(summary.values()))
    assert only["interrupted"] and only["ok"] >= 1 and only["requests_sent"] < 40
    report = (tmp_path / "report.md").read_text()
    # The report must not claim every strategy ran.
    assert "**Interrupted**" in report and "not run: round_robin" in report and "(interrupted:" in report
