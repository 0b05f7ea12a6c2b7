"""The README and the docs pages cannot rot: their commands work from a clone, their tables are the code's.

Every page is read: README.md and docs/*.md (docs/results/ holds generated reports, each with the command
that made it). Cheap things run for real against a proxy this module starts (Python snippets, curl lines,
the error examples with their printed line); servers, benchmarks and long load runs are parsed by the real
CLI parsers instead (every flag, value, file and URL checked as at start-up); what needs a Docker engine, a
GPU is skipped with the reason printed; the real-vLLM recipe (docs/real-vllm.md) is checked with the vLLM venv. Every relative link and
anchor resolves, and every repository path a page names in backquotes exists.
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
DOCS = ROOT / "docs"
PROXY_PAGE = DOCS / "proxy.md"  # the proxy's flag table and headers
VLLM_PAGE = DOCS / "real-vllm.md"  # the real-vLLM recipe: needs the vLLM venv and servers
DOCS_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 60
README_MAX_LINES = 200  # a front page; the rest belongs in a docs/ page


def doc_pages() -> list[Path]:
    """README.md and every page under docs/ but the generated reports in docs/results/."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if "results" not in p.relative_to(DOCS).parts[:1]]
    return [README, *pages]


PAGES = doc_pages()


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    page: str  # path from the repository root, e.g. "docs/proxy.md"
    lang: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"

    @property
    def needs_vllm(self) -> bool:
        return self.page == rel(VLLM_PAGE)


def page_blocks(page: Path) -> list[Block]:
    out, lang, start, buf = [], None, 0, []
    for i, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, buf = line[3:].strip(), i, []
            else:
                out.append(Block(rel(page), lang, start, "\n".join(buf)))
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


BLOCKS = [b for page in PAGES for b in page_blocks(page)]
# The real-vLLM page's blocks are checked whole (heredocs, vLLM's own flags): test_real_vllm_recipe_block.
SHELL = [(b, ln, c) for b in BLOCKS if b.lang in ("bash", "sh") and not b.needs_vllm for ln, c in shell_commands(b)]
VLLM_SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh") and b.needs_vllm]
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
    """`python -m X ARGS`: our CLIs check ARGS as at start-up (no server started); others parse ARGS --help."""
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
        # A benchmark or tool: its argparse reads ARGS up to the trailing --help (a bad subcommand, flag or
        # value fails there, exit 2) and stops before running anything.
        p = subprocess.run([sys.executable, "-m", module, *args, "--help"], cwd=ROOT, capture_output=True,
                           timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()[-2000:]


@pytest.mark.parametrize("block,line,command", SHELL, ids=[f"{b.page}:L{ln}" for b, ln, _ in SHELL])
def test_shell_command(block: Block, line: int, command: str, request):
    where = f"{block.page} line {line}"
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
        pytest.skip(f"{where}: needs a Docker engine{parsed}")
    elif tool == "make":
        p = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()
    elif tool == "source":
        # The venv `make` creates (VENV ?= .venv); absent only when the tests run from another environment.
        assert argv[1] == ".venv/bin/activate" and "VENV ?= .venv" in (ROOT / "Makefile").read_text()
        # Tests run from another environment (a worktree sharing a venv): that venv's activate stands in.
        activate = ROOT / argv[1] if (ROOT / argv[1]).is_file() else Path(sys.prefix) / "bin" / "activate"
        assert activate.is_file(), f"{where}: no {argv[1]} and no venv's activate at {activate}"
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
    elif tool == "kubectl":
        # deploy/kubernetes/ is validated offline (tests/deploy/test_kubernetes.py); applying it needs a cluster
        if argv[1] == "apply":
            manifests = ROOT / argv[argv.index("-f") + 1]
            assert manifests.is_dir() and list(manifests.glob("*.yaml")), where
        elif argv[1] == "scale":
            kind, _, name = argv[2].partition("/")
            assert kind == "deployment" and f"name: {name}\n" in (ROOT / "deploy/kubernetes/deployment.yaml").read_text()
        pytest.skip(f"{where}: needs a Kubernetes cluster (the manifests are validated offline)")
    elif tool == "curl":
        url = request.getfixturevalue("live_url")
        argv = [a.replace(DOCS_URL, url) for a in argv]
        p = subprocess.run([argv[0], "-sS", "--fail", "--max-time", "30", *argv[1:]], capture_output=True,
                           timeout=TIMEOUT_S)
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout.strip()
    else:
        pytest.fail(f"{where}: no rule for {tool!r}; add one here (run, parse or skip with a reason)")


@pytest.mark.parametrize("block", PYTHON, ids=[f"{b.page}:L{b.line}" for b in PYTHON])
def test_python_snippet(block: Block, live_url: str):
    if block.needs_vllm:
        pytest.skip(f"{block.where}: needs the vLLM venv")
    code = block.text.replace(DOCS_URL, live_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    p = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr.decode()[-3000:]


def test_json_blocks_parse():
    """One test over every JSON block (a parametrized one over none would be a skip)."""
    for block in JSON:
        try:
            json.loads(block.text)
        except ValueError as e:
            raise AssertionError(f"{block.where}: {e}") from None


@pytest.mark.timeout(1800)  # may build the vLLM toolchain (tests/conftest.py) and asks vLLM for its flags
@pytest.mark.parametrize("block", VLLM_SHELL, ids=[f"{b.page}:L{b.line}" for b in VLLM_SHELL])
def test_real_vllm_recipe_block(block: Block, vllm_toolchain, tmp_path):
    """Every command of the real-vLLM recipe, checked with the vLLM venv (tests/docs/vllm_recipe.py)."""
    from .vllm_recipe import check_vllm_block

    assert check_vllm_block(block.text, block.where, vllm_toolchain.python, vllm_toolchain.model, tmp_path,
                            check_python_module)


@pytest.mark.parametrize("block", TRANSCRIPTS, ids=[f"{b.page}:L{b.line}" for b in TRANSCRIPTS])
def test_transcript_prints_what_the_page_says(block: Block):
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


def _table_rows(page: Path, heading: str) -> list[list[str]]:
    text = page.read_text()
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
    if value is True:
        return "on"
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
    rows = _table_rows(PROXY_PAGE, "## Configuration")
    documented: dict[str, tuple[str, str]] = {}
    for flags_cell, env_cell, default_cell, _meaning in rows:
        flags = re.findall(r"`(--[a-z-]+)`", flags_cell)
        envs = re.findall(r"`(KVROUTE_[A-Z_]+)`", env_cell)
        cells = [c for c in default_cell.split(", ")] if len(flags) > 1 else [default_cell]
        for k, flag in enumerate(flags):
            documented[flag] = (envs[k] if k < len(envs) else "", cells[k] if len(cells) == len(flags) else "")
    in_parser = {a.option_strings[0]: dest for dest, a in actions.items()}
    assert set(documented) == set(in_parser), (
        f"missing from {rel(PROXY_PAGE)}: {sorted(set(in_parser) - set(documented))}; "
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



# ---- the front page ----------------------------------------------------------------------------------------


def test_readme_is_a_front_page_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): put the detail in the fitting docs/ page "
        "and link it from README's Documentation table")
    first_bash = next(b for b in BLOCKS if b.page == "README.md" and b.lang == "bash")
    assert [c.split()[:2] for _, c in shell_commands(first_bash)] == [["make", "run"], ["make", "test"]]
    linked = set(re.findall(r"\]\((docs/[\w./-]+\.md)\)", README.read_text()))
    assert {rel(p) for p in PAGES[1:] if p.parent == DOCS} <= linked, "every docs page is linked from README"


# ---- links and paths ---------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _CODE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    return [t for t in _LINK.findall(_CODE.sub("", page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


# A path in backquotes that starts with one of the repository's top-level folders names a file or folder of
# the repository (what a reader would open); it must exist. Placeholders (`<workload>`) are not paths.
_TOP = ("kvblocks", "emulator", "proxy", "loadgen", "benchmarks", "tests", "tools", "docs", "examples", ".ci")
_PATH = re.compile(r"`((?:%s)/[\w./-]*)`" % "|".join(re.escape(t) for t in _TOP))


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_every_repository_path_named_exists(page: Path):
    missing = [p for p in _PATH.findall(page.read_text()) if not (ROOT / p).exists()]
    assert not missing, f"{rel(page)} names paths that do not exist: {missing}"


_MODULE = re.compile(r"python -m ((?:%s)(?:\.\w+)*)" % "|".join(t for t in _TOP if t.isidentifier()))


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_every_python_module_named_exists(page: Path):
    """`python -m X` anywhere on a page (prose, tables, indented blocks too) names a module of ours that exists."""
    import importlib.util

    def exists(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    missing = sorted({m for m in _MODULE.findall(page.read_text()) if not exists(m)})
    assert not missing, f"{rel(page)} names modules that do not exist: {missing}"


# ---- the headers table -------------------------------------------------------------------------------------


def _header_table(kind: str) -> dict[str, str]:
    """`| request header | ...` or `| response header | ...` rows of docs/proxy.md: name -> text."""
    text = PROXY_PAGE.read_text()
    part = text[text.index(f"| {kind} header |"):]
    rows = {}
    for line in part.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        cell, what = [c.strip() for c in line.strip().strip("|").split("|", 1)]
        rows[re.match(r"`([\w-]+)", cell).group(1).lower()] = what
    return rows


def test_headers_table_is_what_the_proxy_sends(live_url: str):
    """Every `x-kvroute-*` header an answer carries is in the table, and every one in the table is sent."""
    import urllib.error
    import urllib.request

    documented = _header_table("response")
    assert {"x-kvroute-backend", "x-kvroute-strategy", "x-kvroute-matched-blocks", "x-request-id"} <= set(documented)
    body = json.dumps({"model": "meta-llama/Llama-2-13b-hf", "prompt": "Hello " * 40, "max_tokens": 2}).encode()
    for stream in (False, True):
        req = urllib.request.Request(live_url + "/v1/completions", method="POST",
                                     data=body if not stream else body[:-1] + b', "stream": true}',
                                     headers={"Content-Type": "application/json", "x-request-id": "docs-1"})
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            sent = {k.lower(): v for k, v in r.headers.items()}
            r.read()
        ours = {k for k in sent if k.startswith("x-kvroute-") or k == "x-request-id"}
        assert ours == set(documented), (stream, sorted(ours))
        assert sent["x-request-id"] == "docs-1"
    # The request headers the table lists are the ones the proxy reads: an unknown strategy is refused.
    requested = _header_table("request")
    assert {"x-kvroute-strategy", "x-request-id", "authorization"} <= set(requested)
    req = urllib.request.Request(live_url + "/v1/completions", method="POST", data=body,
                                 headers={"Content-Type": "application/json", "x-kvroute-strategy": "no-such"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=TIMEOUT_S)
    assert e.value.code == 400 and not any(k.lower().startswith("x-kvroute-") for k in e.value.headers)


def test_every_x_kvroute_header_in_the_code_is_in_the_table():
    in_code = set()
    for path in (ROOT / "proxy").rglob("*.py"):
        in_code |= set(re.findall(r"""["'](x-kvroute-[a-z-]+)["']""", path.read_text(), re.I))
    documented = set(_header_table("request")) | set(_header_table("response"))
    assert {h.lower() for h in in_code} <= documented, sorted({h.lower() for h in in_code} - documented)
