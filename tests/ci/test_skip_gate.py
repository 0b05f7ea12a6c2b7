"""The skip gate (tests/skip_gate.py): a run lists every skip, and with KVROUTE_FAIL_ON_SKIP=1 (CI) a
skip outside .ci/skip-allowlist fails it. Real pytest runs of a two-test file, in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.skip_gate import ALLOWLIST, allowlist

ROOT = Path(__file__).resolve().parents[2]
TESTS = '''
import pytest

def test_passes():
    assert True

def test_skips():
    pytest.skip({reason!r})
'''


def _run(tmp_path: Path, reason: str, gate: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(TESTS.format(reason=reason))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVROUTE_", "PYTEST_"))}
    env["PYTHONPATH"] = str(ROOT)
    if gate:
        env["KVROUTE_FAIL_ON_SKIP"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.skip_gate", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_unlisted_skip_fails_a_gated_run_and_is_named(tmp_path):
    r = _run(tmp_path, "needs the vLLM venv", gate=True)
    assert r.returncode == 1, r.stdout
    assert "NOT ALLOWED test_sample.py::test_skips: needs the vLLM venv" in r.stdout
    assert "1 skip(s) not in .ci/skip-allowlist fail this run" in r.stdout


def test_without_the_gate_the_skip_is_listed_and_the_run_passes(tmp_path):
    r = _run(tmp_path, "needs the vLLM venv", gate=False)
    assert r.returncode == 0, r.stdout
    assert "skips: 1 (1 not in .ci/skip-allowlist)" in r.stdout and "test_sample.py::test_skips" in r.stdout


def test_an_allowlisted_skip_passes_a_gated_run(tmp_path):
    r = _run(tmp_path, "README line 9: needs a Docker engine", gate=True)
    assert r.returncode == 0, r.stdout
    assert "allowed     test_sample.py::test_skips: README line 9: needs a Docker engine" in r.stdout


def test_the_allowlist_is_short_and_every_line_says_why():
    entries = allowlist(ALLOWLIST)
    assert 1 <= len(entries) <= 3, entries  # Docker only, today
    assert all(len(why) > 20 for _, why in entries)
