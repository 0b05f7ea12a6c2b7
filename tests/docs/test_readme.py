"""The README cannot rot: its commands work from a clone, its flag table is the parser's.

Cheap things run for real against a proxy this module starts (Python snippets, curl lines, the error
examples with their printed line); servers, benchmarks and long load runs are parsed by the real CLI
parsers instead (every flag, value, file and URL checked as at start-up); what needs a Docker engine,
a GPU or the real-vLLM setup (the "Swap in real vLLM" section) is skipped with the reason printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"
VLLM_SECTION = "Swap in real vLLM"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    lang: str
    section: str  # the enclosing `## ` heading
    line: int
    text: str


def readme_blocks() -> list[Block]:
    out, section, lang, start, buf = [], "", None, 0, []
    for i, line in enumerate(README.read_text().splitlines(), 1):
        if lang is None and line.startswith("## "):  # subsections (###) belong to their section
            section = line[3:].strip()
        if line.startswith("```"):
            if lang is None:
                lang, start, buf = line[3:].strip(), i, []
            else:
                out.append(Block(lang, section, start, "\n".join(buf)))
                lang = None
            continue
        if lang is not None:
            buf.append(line)
    return out


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) per command of a bash block; continuations joined, comments dropped."""
    cmds, cur, first = [], "", 0
    for k, line in enumerate(block.text.splitlines(), block.line + 1):
        if not cur:
            first = k
        cur += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if shlex.split(cur, comments=True):
                cmds.append((first, cur.strip()))
            cur = ""
    return cmds


BLOCKS = readme_blocks()
SHELL = [(b, ln, c) for b in BLOCKS if b.lang in ("bash", "sh") for ln, c in shell_commands(b)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
JSON = [b for b in BLOCKS if b.lang == "json"]
# Unlabelled blocks whose lines start with "$ ": a command and the line(s) it prints.
TRANSCRIPTS = [b for b in BLOCKS if b.lang == "" and b.text.lstrip().startswith("$ ")]


@pytest.fixture(scope="module")
def live_url():
    """A proxy with 2 embedded emulators, 100x faster than the modelled GPU, for snippets and curl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--port", "0", "--emulators", "2", "--time-scale", "0.01",
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.split("listening on", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(TIMEOUT_S)


def _strip_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    return env, argv


def check_python_module(argv: list[str], env: dict[str, str]) -> None:
    """`python -m X ARGS`: our CLIs check ARGS as at start-up (no server started); others answer --help."""
    assert argv[:2] == ["python", "-m"], argv
    module, args = argv[2], argv[3:]
    if module == "proxy":
        from proxy.config import ProxyConfig

        ProxyConfig.from_cli(args, env=env)
    elif module == "emulator":
        from emulator.config import EmulatorConfig

        EmulatorConfig.from_cli(args, env=env)
    elif module == "loadgen":
        from kvblocks.cli import exit_on_usage_error
        from loadgen.__main__ import PROG, check_args

        with exit_on_usage_error(PROG):
            check_args(args)
    else:
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()[-2000:]


@pytest.mark.parametrize("block,line,command", SHELL, ids=[f"L{ln}" for _, ln, _ in SHELL])
def test_shell_command(block: Block, line: int, command: str, request):
    if block.section == VLLM_SECTION:
        pytest.skip(f"README line {line}: needs the vLLM venv and servers ('{VLLM_SECTION}'): {command[:60]}")
    env, argv = _strip_env(shlex.split(command, comments=True))
    tool = argv[0]
    if tool == "docker":
        # The container's command still has to parse: its own, or the image's default `python -m proxy`
        # with the `-e` variables (the image sets KVROUTE_HOST=0.0.0.0, KVROUTE_LOG_FORMAT=json).
        parsed = ""
        if argv[1:3] == ["run"] or argv[1] == "run":
            image_env = {"KVROUTE_HOST": "0.0.0.0", "KVROUTE_PORT": "8000", "KVROUTE_LOG_FORMAT": "json"}
            image_env.update(dict(a.split("=", 1) for k, a in zip(argv, argv[1:]) if k == "-e"))
            if "python" in argv:
                check_python_module(argv[argv.index("python"):], image_env)
            elif argv[-1] == "kvroute":
                check_python_module(["python", "-m", "proxy"], image_env)
            parsed = " (its command parsed)"
        pytest.skip(f"README line {line}: needs a Docker engine{parsed}")
    elif tool == "make":
        p = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()
    elif tool == "source":
        # The venv `make` creates (VENV ?= .venv); absent only when the tests run from another environment.
        assert argv[1] == ".venv/bin/activate" and "VENV ?= .venv" in (ROOT / "Makefile").read_text()
        if not (ROOT / argv[1]).is_file():
            pytest.skip(f"README line {line}: no .venv here (tests run from another environment)")
    elif tool == "python":
        check_python_module(argv, env)
    elif tool == "bash" and len(argv) >= 2 and argv[1].endswith(".sh"):
        # a long-running script of the repo's (e.g. every sweep): it exists and bash can parse it; the
        # names it is given are ones it runs (`run NAME ...` lines)
        p = subprocess.run(["bash", "-n", argv[1]], cwd=ROOT, capture_output=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()
        script = (ROOT / argv[1]).read_text()
        for sourced in re.findall(r'^source "\$\(dirname "\$0"\)/([\w.-]+)"', script, re.M):
            script += (ROOT / argv[1]).parent.joinpath(sourced).read_text()  # its `run` lines may live there
        assert all(f"\nrun {name} " in script for name in argv[2:]), argv
    elif tool == ".venv/bin/python" and argv[1:3] == ["-m", "pytest"]:
        # a test command: its test files must exist (running them is the suite's own job)
        paths = [a.split("::")[0] for a in argv[3:] if not a.startswith("-")]
        assert paths and all((ROOT / x).exists() for x in paths), paths
    elif tool == ".venv/bin/python":
        check_python_module(["python", *argv[1:]], env)
    elif tool == "curl":
        url = request.getfixturevalue("live_url")
        argv = [a.replace(README_URL, url) for a in argv]
        p = subprocess.run([argv[0], "-sS", "--fail", "--max-time", "30", *argv[1:]], capture_output=True,
                           timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout.strip()
    else:
        pytest.fail(f"README line {line}: no rule for {tool!r}; add one here (run, parse or skip with a reason)")


@pytest.mark.parametrize("block", PYTHON, ids=[f"L{b.line}" for b in PYTHON])
def test_python_snippet(block: Block, live_url: str):
    if block.section == VLLM_SECTION:
        pytest.skip(f"README line {block.line}: '{VLLM_SECTION}' needs the vLLM venv")
    code = block.text.replace(README_URL, live_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    p = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr.decode()[-3000:]


@pytest.mark.parametrize("block", JSON, ids=[f"L{b.line}" for b in JSON])
def test_json_block(block: Block):
    if block.section == VLLM_SECTION:
        pytest.skip(f"README line {block.line}: '{VLLM_SECTION}' is the lead's (real vLLM)")
    json.loads(block.text)


@pytest.mark.parametrize("block", TRANSCRIPTS, ids=[f"L{b.line}" for b in TRANSCRIPTS])
def test_transcript_prints_what_the_readme_says(block: Block):
    lines = block.text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        expected = []
        for nxt in lines[i + 1:]:
            if nxt.startswith("$ "):
                break
            expected.append(nxt)
        env, argv = _strip_env(shlex.split(line[2:]))
        assert argv[0] == "python"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")} | env
        p = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=full_env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
        assert (p.stdout + p.stderr).strip().splitlines() == expected, p.stderr


# ---- the proxy's flag table --------------------------------------------------------------------------------


def _table_rows(heading: str) -> list[list[str]]:
    text = README.read_text()
    part = text[text.index(heading):]
    rows = []
    for line in part.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `--"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _norm(value: object) -> str:
    if value is None or value == [] or value == "":
        return "none"
    if value is False:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    text = text.strip().removesuffix(" s").removesuffix(" (off)").strip()
    m = re.fullmatch(r"(\d+) MiB", text)
    return str(int(m.group(1)) * 1024 * 1024) if m else (f"{float(text):g}" if re.fullmatch(r"\d+(\.\d+)?", text) else text)


def test_proxy_flag_table_matches_the_parser():
    from proxy.config import ProxyConfig, _build_parser

    parser = _build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(ProxyConfig)}
    rows = _table_rows("### Configuration")
    documented: dict[str, tuple[str, str]] = {}
    for flags_cell, env_cell, default_cell, _meaning in rows:
        flags = re.findall(r"`(--[a-z-]+)`", flags_cell)
        envs = re.findall(r"`(KVROUTE_[A-Z_]+)`", env_cell)
        cells = [c for c in default_cell.split(", ")] if len(flags) > 1 else [default_cell]
        for k, flag in enumerate(flags):
            documented[flag] = (envs[k] if k < len(envs) else "", cells[k] if len(cells) == len(flags) else "")
    in_parser = {a.option_strings[0]: dest for dest, a in actions.items()}
    assert set(documented) == set(in_parser), (
        f"missing from README: {sorted(set(in_parser) - set(documented))}; "
        f"not flags: {sorted(set(documented) - set(in_parser))}")
    for flag, (env, default) in documented.items():
        dest = in_parser[flag]
        if env:
            assert env in ("KVROUTE_" + flag[2:].replace("-", "_").upper(), "KVROUTE_" + dest.upper()), (flag, env)
        if default and dest in defaults:
            assert _cell(default) == _norm(defaults[dest]), (flag, default, defaults[dest])


def _actions(parser: argparse.ArgumentParser, name: str):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from _actions(sp, f"{name} {sub}")
        elif a.option_strings and a.dest != "help":
            yield name, a


def test_every_flag_of_every_cli_has_help_with_its_default_and_choices():
    from emulator.config import build_parser as emulator_parser
    from loadgen.__main__ import build_parser as loadgen_parser
    from proxy.config import _build_parser as proxy_parser

    for parser, name in ((proxy_parser(), "proxy"), (emulator_parser(), "emulator"), (loadgen_parser(), "loadgen")):
        for where, a in _actions(parser, name):
            assert a.help and "default" in a.help, f"{where} {a.option_strings[0]}: help must state the default"
            if a.choices and a.metavar:
                assert all(str(c) in a.help for c in a.choices), f"{where} {a.option_strings[0]}: list the choices"
    # The benchmark CLIs state defaults through argparse's ArgumentDefaultsHelpFormatter.
    for module, sub in (("benchmarks.proxy_bench", "decide"), ("benchmarks.proxy_bench", "overhead"), ("benchmarks.proxy_bench", "soak"),
                        ("benchmarks.emulator_bench", None)):
        p = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr
        flags = re.findall(r"^  (--[a-z-]+)", p.stdout, re.M)
        blocks = re.split(r"\n  (?=--)", p.stdout.split("options:", 1)[1])
        assert flags and all("(default: " in " ".join(b.split()) for b in blocks if not b.lstrip().startswith("-h")), (module, sub)

