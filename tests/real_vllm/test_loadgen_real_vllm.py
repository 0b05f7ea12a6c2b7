"""`python -m loadgen compare` against a proxy in front of the two real vLLM servers.

The report and plots are written, and for every strategy the cached tokens the load generator
counted from `usage` equal what vLLM added to its own `vllm:prefix_cache_hits_total`.
"""
from __future__ import annotations

import asyncio
import json
import sys

import pytest

from .conftest import VLLMPair
from .helpers import proxy_for
from .vllm_server import MAX_MODEL_LEN, MODEL_NAME

pytestmark = pytest.mark.timeout(1800)


async def test_loadgen_compare_on_real_vllm(vllm: VLLMPair, tmp_path):
    out = tmp_path / "compare"
    async with proxy_for(vllm, tmp_path, exact=True) as p:
        argv = [
            sys.executable, "-m", "loadgen", "compare", "--target", p.url + "/v1", "--model", MODEL_NAME,
            "--workload", "rag", "--requests", "24", "--documents", "4", "--doc-tokens-min", "200",
            "--doc-tokens-max", "500", "--question-tokens", "20", "--output-tokens", "8",
            "--max-model-len", str(MAX_MODEL_LEN), "--rate", "4", "--seed", "1",
            "--strategies", "kv_aware,round_robin", "--out", str(out), "--no-progress", "--reset-target",
        ]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 900)
    text = stdout.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert (out / "report.md").exists()
    assert list(out.glob("*.png")), "no comparison plots"
    summaries = json.loads((out / "summary.json").read_text())
    assert set(summaries) == {"kv_aware", "round_robin"}
    for name, s in summaries.items():
        assert s["errors"] == 0 and s["ok"] == 24, (name, s["errors"])
        hits = s["backend_metrics"]["prefix_hits_delta_total"]
        assert s["cached_tokens"] == hits, (name, s["cached_tokens"], hits)
        assert s["cached_tokens"] > 0, name
