"""The CPU recipe for a real vLLM server in docs/real-vllm.md is the command these tests run (no server needed)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from .vllm_server import BLOCK_SIZE, MAX_MODEL_LEN, MODEL_NAME, NUM_BLOCKS, VLLMServer

RECIPE = Path(__file__).resolve().parents[2] / "docs" / "real-vllm.md"


def _docs_vllm_command() -> list[str]:
    text = RECIPE.read_text()
    section = text[text.index("## On a laptop"):text.index("## On GPUs")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    line = next(ln for ln in joined.splitlines() if "vllm.entrypoints.openai.api_server" in ln)
    return shlex.split(line)


def _flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                out[a] = nxt
                i += 2
                continue
            out[a] = None
        i += 1
    return out


def test_docs_vllm_command_is_the_tests_command():
    docs = _docs_vllm_command()
    env = {k: v for k, v in (w.split("=", 1) for w in docs if re.fullmatch(r"[A-Z_]+=\S*", w))}
    server = VLLMServer("a", Path("py"), Path("/tmp/tiny-llama"), api_key="vllm-key-a")
    assert all(server.env().get(k) == v for k, v in env.items()), env
    theirs, ours = _flags(docs), _flags(server.argv())
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    for flag, want in (("--block-size", BLOCK_SIZE), ("--max-model-len", MAX_MODEL_LEN),
                       ("--num-gpu-blocks-override", NUM_BLOCKS), ("--served-model-name", MODEL_NAME)):
        assert theirs[flag] == ours[flag] == str(want), flag
    kv_docs, kv_tests = json.loads(theirs["--kv-events-config"]), json.loads(ours["--kv-events-config"])
    assert set(kv_docs) == set(kv_tests)
    assert kv_docs["endpoint"].startswith("tcp://*:") and kv_tests["endpoint"].startswith("tcp://*:")
