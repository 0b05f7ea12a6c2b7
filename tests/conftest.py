"""Suite-wide: the real-vLLM toolchain every test that needs vLLM shares, and the skip gate.

The venv (tools/vllm_env.sh) and the tiny model (tools/make_tiny_model.py) are built by one session
fixture the first time any test asks for them, whatever the order the tests run in: the scheduler
differential in tests/emulator/ no longer depends on tests/real_vllm/ having built the model first.
Where vLLM cannot be built the tests skip with the reason; KVROUTE_REQUIRE_VLLM=1 makes that a failure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.progress import say
from tests.real_vllm.vllm_server import VLLMUnavailable, tiny_model, unavailable, vllm_python
from tests.skip_gate import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401  (hooks)


@dataclass(frozen=True)
class VLLMToolchain:
    python: Path  # the vLLM venv's interpreter
    model: Path  # the tiny model's folder (config.json, tokenizer, random weights)


@pytest.fixture(scope="session")
def vllm_toolchain(request: pytest.FixtureRequest) -> VLLMToolchain:
    say(request, "vLLM toolchain: the venv (tools/vllm_env.sh; a first build takes ~4 min) and the tiny model")
    try:
        py = vllm_python()
        model = tiny_model(py)
    except VLLMUnavailable as e:
        unavailable(str(e))
    say(request, f"vLLM toolchain: {py} and {model}")
    return VLLMToolchain(py, model)
