"""The proxy ships without the emulator: with the `emulator` package unimportable, every proxy module
imports and `python -m proxy --backend URL` serves a request (the emulator is the backend here, in
the test's own process, where it is importable)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from emulator.config import EmulatorConfig
from emulator.server import start_emulator

from .conftest import MODEL, TIME_SCALE

ROOT = Path(__file__).resolve().parents[2]

# Prepended to the child: any import of `emulator` or a submodule fails as if it were not installed.
BLOCK_EMULATOR = """
import importlib.abc, sys
class _NoEmulator(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "emulator" or name.startswith("emulator."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoEmulator())
for m in [m for m in sys.modules if m == "emulator" or m.startswith("emulator.")]:
    del sys.modules[m]
"""

IMPORT_EVERY_PROXY_MODULE = BLOCK_EMULATOR + """
import importlib, pkgutil, proxy
names = [m.name for m in pkgutil.walk_packages(proxy.__path__, "proxy.")]
for n in names:
    importlib.import_module(n)
try:
    import emulator
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker let emulator through")
print(len(names), "modules")
"""

RUN_PROXY = BLOCK_EMULATOR + """
import runpy
sys.argv = ["proxy", *sys.argv[1:]]
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}


async def test_every_proxy_module_imports_without_the_emulator():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", IMPORT_EVERY_PROXY_MODULE, cwd=ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert int(out.split()[0]) >= 30  # the walk really found the wings


async def test_proxy_serves_a_backend_without_the_emulator_package():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_PROXY, "--port", "0", "--backend", em.url, "--log-level", "warning",
        "--time-scale", str(TIME_SCALE), cwd=ROOT, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, f"proxy exited before listening: {(await proc.stderr.read()).decode()[-3000:]}"
            if "listening on" in line:
                url = line.split("listening on", 1)[1].split()[0]
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hello " * 40, "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-kvroute-backend"] == em.url
                assert (await r.json())["usage"]["completion_tokens"] == 2
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        await em.stop()
    assert proc.returncode == 0, err.decode()[-2000:]
