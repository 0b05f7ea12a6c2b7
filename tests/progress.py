"""Progress lines for the suite's long phases (vLLM builds and start-ups, the differentials), shown
at once even while pytest captures output: minutes of silence read as a hang."""
from __future__ import annotations

import sys
import time

import pytest


def say(request: pytest.FixtureRequest | pytest.Config, message: str) -> None:
    """Print `message` to the terminal now, past pytest's capture (plain stderr without pytest)."""
    config = request if isinstance(request, pytest.Config) else request.config
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    capman = config.pluginmanager.getplugin("capturemanager")
    tr = config.pluginmanager.getplugin("terminalreporter")
    if capman is None or tr is None:
        print(line, file=sys.stderr, flush=True)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(line)
