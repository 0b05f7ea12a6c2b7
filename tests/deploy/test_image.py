"""What can be checked of the container image without a Docker engine (none runs here).

The Dockerfile parses, every file it COPYs exists and is not dockerignored, the image's install step
(`pip install .` of exactly the copied files into a fresh venv) gives working entry points, and the
default command starts and answers /health.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .dockerfile_check import copy_sources, dockerignore_patterns, ignored, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE)


def test_dockerfile_shape(instructions):
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for f in froms:
        assert f.args.startswith("python:") and "slim" in f.args, f.args
    final = max(i.stage for i in instructions)
    final_ins = [i for i in instructions if i.stage == final]
    kw = {i.keyword for i in final_ins}
    assert {"USER", "EXPOSE", "HEALTHCHECK", "CMD"} <= kw
    user = [i for i in final_ins if i.keyword == "USER"][-1].args
    assert user not in ("root", "0")
    assert "8000" in [i for i in final_ins if i.keyword == "EXPOSE"][-1].args
    assert "/health" in [i for i in final_ins if i.keyword == "HEALTHCHECK"][-1].args
    assert '"proxy"' in [i for i in final_ins if i.keyword == "CMD"][-1].args


def test_copied_files_exist_and_are_in_context(instructions):
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    sources = [s for i in instructions if i.keyword in ("COPY", "ADD") for s in copy_sources(i)]
    assert sources
    for s in sources:
        assert (ROOT / s).exists(), f"COPY source {s} is missing"
        assert not ignored(s, patterns), f"COPY source {s} is excluded by .dockerignore"
    for kept_out in ("tests", ".venv", ".git", "results"):
        assert ignored(kept_out, patterns), f"{kept_out} should be dockerignored"


def _build_context(tmp: Path, instructions) -> Path:
    """Exactly the files the build stage COPYs, as the image sees them."""
    ctx = tmp / "context"
    ctx.mkdir()
    for ins in instructions:
        if ins.keyword != "COPY":
            continue
        for s in copy_sources(ins):
            src = ROOT / s
            if src.is_dir():
                shutil.copytree(src, ctx / s, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(src, ctx / s)
    return ctx


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory, instructions):
    tmp = tmp_path_factory.mktemp("image")
    ctx = _build_context(tmp, instructions)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ctx)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return py


@pytest.mark.parametrize("module", ["proxy", "emulator", "loadgen"])
def test_entry_points_run(image_venv, module, tmp_path):
    r = subprocess.run([str(image_venv), "-m", module, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_command_answers_health(image_venv, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    env.update(KVROUTE_HOST="127.0.0.1", KVROUTE_PORT=str(port), KVROUTE_LOG_FORMAT="json")
    proc = subprocess.Popen([str(image_venv), "-m", "proxy"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    status = resp.status
                    break
            except OSError:
                time.sleep(0.1)  # polling a server that is starting, bounded by the deadline
        assert status == 200, f"no /health answer; exit={proc.poll()}"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]


def test_installed_package_carries_the_trace_and_its_licence(image_venv, tmp_path):
    """A non-editable install (what the image has) replays the shipped trace with no --trace-path."""
    code = ("from pathlib import Path; from loadgen.config import DEFAULT_TRACE, WorkloadConfig; "
            "from loadgen.workloads import build_workload; p = Path(DEFAULT_TRACE); "
            "assert 'site-packages' in str(p), p; "
            "assert (p.parent / 'SOURCES.md').is_file() and (p.parent / 'LICENSE-Apache-2.0.txt').is_file(); "
            "print(len(build_workload(WorkloadConfig(name='trace', requests=3)).requests))")
    r = subprocess.run([str(image_venv), "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "3"
