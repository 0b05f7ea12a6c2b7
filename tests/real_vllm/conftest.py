"""Two real vLLM servers, started once per test run for every test in this folder.

Server `a` requires an API key (as a production server would), `b` does not and also serves two tiny
LoRA adapters (`sql`, `chat`) with --max-loras 1; both publish KV events with a replay socket, serve a
32-token-block cache of 128 blocks and the tiny local model. A machine
where vLLM cannot be installed or started skips these tests with the reason (pytest -ra prints it);
with KVROUTE_REQUIRE_VLLM=1 (CI) that is a failure instead.
"""
from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..progress import say
from .vllm_server import DIFF_BUDGET, VLLMServer, VLLMUnavailable, lora_args, start_servers, tiny_adapters, unavailable

API_KEY_A = "vllm-key-a"


@dataclass
class VLLMPair:
    a: VLLMServer
    b: VLLMServer
    setup_s: float
    log_dir: Path
    adapters: dict[str, Path]  # served by b

    @property
    def servers(self) -> list[VLLMServer]:
        return [self.a, self.b]

    def key(self, s: VLLMServer) -> str | None:
        return s.api_key

    def reset_caches(self) -> None:
        """Empty both prefix caches (dev-mode /reset_prefix_cache), so each test starts cold. vLLM refuses
        ({"success": false}) while a request still holds blocks, e.g. one a previous test abandoned."""
        for s in self.servers:
            for _ in range(100):
                req = urllib.request.Request(s.url + "/reset_prefix_cache", data=b"", method="POST")
                with urllib.request.urlopen(req, timeout=30) as r:
                    if json.loads(r.read()).get("success"):
                        break
                time.sleep(0.2)  # bounded wait for the server's running requests to end
            else:
                raise AssertionError(f"vLLM {s.name} never accepted a prefix-cache reset")


_unavailable = unavailable  # (test_vllm_code.py's name for it)


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory, vllm_toolchain, request) -> Iterator[VLLMPair]:
    t0 = time.monotonic()
    py, model = vllm_toolchain.python, vllm_toolchain.model
    try:
        adapters = tiny_adapters(py)
    except VLLMUnavailable as e:
        unavailable(str(e))
    log_dir = tmp_path_factory.mktemp("vllm")
    # a runs at most 4 sequences, so a burst leaves some waiting (vllm:num_requests_waiting)
    a = VLLMServer("a", py, model, api_key=API_KEY_A, cpu=0, extra_args=["--max-num-seqs", "4"])
    # b prefills at most 256 tokens a step: the emulator differential needs chunked prefill to compare
    # b also serves two adapters, at most one per step (vLLM's LoRA scheduling; issue #23's tests)
    b = VLLMServer("b", py, model, cpu=1, extra_args=["--max-num-batched-tokens", str(DIFF_BUDGET), *lora_args(adapters)])
    say(request, f"real vLLM: starting two servers (~1-2 min on 2 cores); logs in {log_dir}")
    try:
        start_servers([a, b], log_dir)
    except VLLMUnavailable as e:
        unavailable(str(e))
    pair = VLLMPair(a, b, time.monotonic() - t0, log_dir, adapters)
    say(request, f"real vLLM: two servers up in {pair.setup_s:.0f}s ({a.url}, {b.url})")
    try:
        yield pair
    finally:
        for s in (a, b):
            s.stop()


@pytest.fixture
def vllm(vllm_pair: VLLMPair) -> VLLMPair:
    """The pair with both caches emptied."""
    vllm_pair.reset_caches()
    return vllm_pair
