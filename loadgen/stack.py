"""The system under test when none is given: a proxy with embedded emulators, started for the run.

`subprocess` (the CLI default) runs `python -m proxy` in its own process, so the proxy and its
emulators do not share a CPU with the load generator; `inprocess` serves them on the caller's
event loop (tests: fast start, port 0 either way).
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from .backend_metrics import base_url

SPAWN_MODES = ("subprocess", "inprocess")
_LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_S = 60.0


@dataclass
class Stack:
    """Where to send requests, and how to describe it in a report."""

    target: str
    description: str


@asynccontextmanager
async def managed_proxy(target: str | None, time_scale: float, backends: int = 4,
                        spawn: str = "subprocess") -> AsyncIterator[Stack]:
    """Yield `target` as is, or start a proxy (port 0) whose `backends` emulators use `time_scale` (wall s per emulated s)."""
    if target:
        yield Stack(target, f"{target} (running proxy)")
        return
    if spawn not in SPAWN_MODES:
        raise ValueError(f"spawn must be one of {', '.join(SPAWN_MODES)}")
    desc = f"with {backends} embedded emulators (time scale {time_scale:g}, proxy default configuration)"
    if spawn == "inprocess":
        async with _inprocess(time_scale, backends) as url:
            yield Stack(url, f"proxy started in-process by the load generator at {url} {desc}")
    else:
        async with _subprocess(time_scale, backends) as url:
            yield Stack(url, f"`python -m proxy --port 0 --time-scale {time_scale:g} --emulators {backends}` "
                             f"started by the load generator at {url} {desc}")


@asynccontextmanager
async def _inprocess(time_scale: float, backends: int) -> AsyncIterator[str]:
    """The two apps composed here, as `python -m proxy` composes them: emulators first, the proxy over their URLs."""
    from emulator import embedded
    from proxy.app import start_proxy
    from proxy.config import ProxyConfig

    config = ProxyConfig(host="127.0.0.1", port=0, time_scale=time_scale, emulators=backends, log_level="warning")
    emulators = await embedded.start(
        config.emulators, host=config.host, profile=config.profile, time_scale=config.time_scale,
        block_size=config.block_size, hash_algo=config.hash_algo, model=config.emulator_model,
    )
    try:
        running = await start_proxy(replace(config, backends=[e.url for e in emulators]))
    except BaseException:
        for e in emulators:
            await e.stop()
        raise
    running.emulators = list(emulators)
    try:
        yield base_url(running.url) + "/v1"
    finally:
        await running.stop()


@asynccontextmanager
async def _subprocess(time_scale: float, backends: int) -> AsyncIterator[str]:
    cmd = [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", "0", "--time-scale", str(time_scale),
           "--emulators", str(backends), "--log-level", "warning"]
    # Own session: a terminal Ctrl-C reaches only the load generator, which then stops the proxy itself.
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                start_new_session=True)
    drain: asyncio.Task | None = None
    try:
        url = await asyncio.wait_for(_read_url(proc), START_TIMEOUT_S)
        drain = asyncio.create_task(_drain(proc))
        yield base_url(url) + "/v1"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()


async def _read_url(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"python -m proxy exited (code {await proc.wait()}) before listening")
        m = _LISTENING.search(line.decode(errors="replace"))
        if m:
            return m.group(1)


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass
