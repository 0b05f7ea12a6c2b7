"""The real-vLLM page's checker (tests/docs/vllm_recipe.py) rejects what it must: a flag vLLM does not
have, a heredoc whose JSON is broken, a command it has no rule for. No vLLM needed here."""
from __future__ import annotations

from pathlib import Path

import pytest

from . import vllm_recipe
from .vllm_recipe import _commands, check_vllm_block

BLOCK = """VLLM=$(bash tools/vllm_env.sh)   # prints the venv
$VLLM/bin/python tools/make_tiny_model.py /tmp/tiny-llama
cat > backends.json <<'JSON'
[{{"url": "http://127.0.0.1:8101"}}]
JSON
$VLLM/bin/python -m vllm.entrypoints.openai.api_server --model /tmp/tiny-llama \\
  --block-size 32 {extra}
"""


def _check(text: str, tmp_path: Path, monkeypatch) -> int:
    monkeypatch.setattr(vllm_recipe, "vllm_flags", lambda py: frozenset({"--model", "--block-size"}))
    return check_vllm_block(text, "page", Path("py"), tmp_path, tmp_path, lambda argv, env: None)


def test_commands_join_continuations_and_keep_heredocs_whole():
    cmds = _commands(BLOCK.format(extra=""))
    assert [c[0].split()[0] for c in cmds] == ["VLLM=$(bash", "$VLLM/bin/python", "cat", "$VLLM/bin/python"]
    assert cmds[2][1] == '[{"url": "http://127.0.0.1:8101"}]' and "--block-size 32" in cmds[3][0]


def test_a_good_block_passes_and_each_mistake_is_named(tmp_path, monkeypatch):
    assert _check(BLOCK.format(extra=""), tmp_path, monkeypatch) == 4
    assert (tmp_path / "backends.json").exists()
    with pytest.raises(AssertionError, match=r"not flags of vLLM's server: \['--blok-size'\]"):
        _check(BLOCK.format(extra="--blok-size 16"), tmp_path, monkeypatch)
    with pytest.raises(ValueError):
        _check(BLOCK.format(extra="").replace('"http', 'http'), tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="no rule for"):
        _check("docker compose up", tmp_path, monkeypatch)
