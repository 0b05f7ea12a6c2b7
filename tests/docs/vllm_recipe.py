"""Checking the real-vLLM page's shell blocks instead of skipping them (the skip gate allows none).

A block is read as the shell would run it: `VAR=$(bash tools/x.sh)` (the script exists and parses),
`$VLLM/bin/python tools/x.py` (the script exists), vLLM's own server commands (`... -m
vllm.entrypoints.openai.api_server FLAGS`, `vllm serve MODEL FLAGS`: every flag is one vLLM 0.32's
parser lists in its --help; tests/real_vllm/test_readme_recipe.py checks the CPU command equals the
one the suite runs), a heredoc (`cat > FILE <<'TAG'`: its JSON parses; it is written to a temporary
folder for the commands after it) and our own commands (parsed as at start-up, with the page's model
paths standing for the tiny model the suite builds and the heredoc's files for the written ones).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Paths a page uses for a model folder; each stands for the tiny model the suite builds.
MODEL_PLACEHOLDERS = ("/tmp/tiny-llama", "/models/llama-2-13b")


@functools.cache
def vllm_flags(python: Path) -> frozenset[str]:
    """Every --flag vLLM's OpenAI server parser lists (one `--help`, ~20-80 s on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "KVROUTE_"))}
    p = subprocess.run([str(python), "-m", VLLM_SERVER_MODULE, "--help"], capture_output=True, text=True,
                       timeout=600, env={**env, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
    assert p.returncode == 0, p.stderr[-2000:]
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9-]*)", p.stdout))


def _commands(text: str) -> list[tuple[str, str | None]]:
    """(command, heredoc body or None) per command of a bash block, continuations joined."""
    out: list[tuple[str, str | None]] = []
    lines = text.splitlines()
    i, cur = 0, ""
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        m = re.search(r"<<\s*'?(\w+)'?\s*$", cur)
        body = None
        if m:
            tag, start = m.group(1), i
            while i < len(lines) and lines[i].strip() != tag:
                i += 1
            body, i = "\n".join(lines[start:i]), i + 1
        if shlex.split(cur, comments=True):
            out.append((cur.strip(), body))
        cur = ""
    return out


def _strip_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    return env, argv


def _check_vllm_flags(argv: list[str], flags: frozenset[str], where: str) -> None:
    unknown = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0] not in flags]
    assert not unknown, f"{where}: not flags of vLLM's server: {unknown}"


def check_vllm_block(text: str, where: str, python: Path, model: Path, tmp: Path,
                     check_python_module: Callable[[list[str], dict[str, str]], None]) -> int:
    """Check every command of a real-vLLM bash block; the number checked (AssertionError on a bad one)."""
    written: dict[str, str] = {}
    n = 0
    for command, heredoc in _commands(text):
        n += 1
        script = re.fullmatch(r"\w+=\$\(bash (\S+)\)(\s+#.*)?", command)
        if script:
            path = ROOT / script.group(1)
            assert path.is_file(), f"{where}: {script.group(1)} does not exist"
            r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"{where}: {r.stderr}"
            continue
        env, argv = _strip_env(shlex.split(command, comments=True))
        if heredoc is not None:
            m = re.search(r"cat\s*>\s*(\S+)", command)
            assert m, f"{where}: a heredoc that is not `cat > FILE`: {command}"
            if m.group(1).endswith(".json"):
                json.loads(heredoc)
            dest = tmp / Path(m.group(1)).name
            dest.write_text(heredoc + "\n")
            written[m.group(1)] = str(dest)
            continue
        if argv[0] == "vllm" and argv[1:2] == ["serve"]:
            _check_vllm_flags(argv[3:], vllm_flags(python), where)
        elif argv[0].endswith("/bin/python") and argv[1:3] == ["-m", VLLM_SERVER_MODULE]:
            _check_vllm_flags(argv[3:], vllm_flags(python), where)
        elif argv[0].endswith("/bin/python") and argv[1].endswith(".py") and not argv[0].startswith(".venv"):
            assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        elif argv[0] in ("python", ".venv/bin/python") and argv[1:3] == ["-m", "proxy"]:
            args = [written.get(a, str(model) if a in MODEL_PLACEHOLDERS else a) for a in argv[3:]]
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # the command's VAR=value prefix (a backends file's api_key_env reads it)
            try:
                check_python_module(["python", "-m", "proxy", *args], env)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            raise AssertionError(f"{where}: no rule for {command[:60]!r}; add one in tests/docs/vllm_recipe.py")
    return n
