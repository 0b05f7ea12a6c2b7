"""Shared pieces of the reliability tests: polling with a deadline, subprocess servers, metric reads."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

MODEL = "meta-llama/Llama-2-13b-hf"
TIME_SCALE = 0.01
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until true or fail after `timeout` seconds (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_async(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def engines_idle(emulators: Sequence) -> bool:
    return all(e.engine.block_pool.num_referenced_blocks() == 0 and e.engine.num_unfinished == 0 for e in emulators)


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric family `name` in a Prometheus exposition, keyed by sorted label pairs."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


class ServerProcess:
    """A `python -m emulator|proxy` child on an OS-assigned port; the URL is read from its first lines."""

    def __init__(self, module: str, args: Sequence[str], ready: str, stderr=subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        self.url = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if ready in line:
                self.url = next(t.rstrip(",;)") for t in line.split() if t.startswith("http://"))
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"python -m {module} {' '.join(args)} did not start")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode
