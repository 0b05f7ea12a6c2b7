"""The skip gate: every skip is listed at the end of a run, and with KVROUTE_FAIL_ON_SKIP=1 (CI) a skip
whose reason no line of `.ci/skip-allowlist` matches fails the run.

A skip is a test that proved nothing; on a fresh machine a silent one reads as a pass (the scheduler
differential once skipped on every first `make test`). The allowlist is short and says why per line.
Loaded by tests/conftest.py; usable on its own as `pytest -p tests.skip_gate`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWLIST = ROOT / ".ci" / "skip-allowlist"
GATE_ENV = "KVROUTE_FAIL_ON_SKIP"
_UNLISTED = pytest.StashKey[list]()


def allowlist(path: Path = ALLOWLIST) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, why) per non-comment line `REGEX  # why`; a line without its why is refused."""
    out = []
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, sep, why = line.partition("  # ")
        if not sep or not why.strip():
            raise ValueError(f"{path}:{n}: expected 'REGEX  # why it may skip', got {line!r}")
        out.append((re.compile(pattern.strip()), why.strip()))
    return out


def skips(terminalreporter) -> list[tuple[str, str]]:
    """(test id, reason) of every skip of the run, collection-time skips included."""
    out = []
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        out.append((rep.nodeid, reason.removeprefix("Skipped: ")))
    return out


def unlisted(found: list[tuple[str, str]], allowed: list[tuple[re.Pattern[str], str]]) -> list[tuple[str, str]]:
    return [(node, why) for node, why in found if not any(p.search(f"{node}: {why}") for p, _ in allowed)]


def gate_on() -> bool:
    return os.environ.get(GATE_ENV, "") not in ("", "0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    bad = unlisted(skips(tr), allowlist())
    session.config.stash[_UNLISTED] = bad
    if gate_on() and bad and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    found = skips(terminalreporter)
    bad = config.stash.get(_UNLISTED, [])
    if not found and not gate_on():
        return
    terminalreporter.section(f"skips: {len(found)} ({len(bad)} not in .ci/skip-allowlist)")
    for node, why in found:
        mark = "NOT ALLOWED" if (node, why) in bad else "allowed"
        terminalreporter.write_line(f"{mark:11s} {node}: {why}")
    if bad and gate_on():
        terminalreporter.write_line(f"{GATE_ENV}=1: {len(bad)} skip(s) not in .ci/skip-allowlist fail this run",
                                    red=True)
