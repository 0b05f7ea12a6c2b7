"""SIGTERM on a real proxy process: it stops accepting, lets open streams finish within the grace period
(ending the rest with an error event, never a silent cut), and exits 0."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulator

PY = sys.executable


async def _spawn_proxy(backend: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `python -m proxy` and read where it listens (async: the emulator shares this loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "proxy", "--port", "0", "--backend", backend, *extra,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async def listening() -> str:
        async for raw in proc.stdout:
            line = raw.decode()
            if "listening on" in line:
                return line.split("listening on", 1)[1].split()[0]
        pytest.fail("proxy exited before it listened")
    try:
        return proc, await asyncio.wait_for(listening(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


@contextlib.asynccontextmanager
async def _proxy_over_emulator(*extra: str):
    """A real proxy process over an in-process emulator whose 0.9 ms tokens let a signal land mid-stream."""
    emu = await start_emulator(EmulatorConfig(port=0, time_scale=0.05, log_requests=False))
    proc, url = await _spawn_proxy(emu.url, *extra)
    drain = asyncio.ensure_future(proc.stdout.read())  # keep the pipe from filling
    try:
        yield emu, proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await drain
        await emu.stop()


async def _stream_events(url: str, max_tokens: int, on_first) -> list[str]:
    """The SSE data payloads of one streamed completion; `on_first` runs when the first arrives."""
    body = {"model": "meta-llama/Llama-2-13b-hf", "prompt": "hello " * 50, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        on_first()
    return events


async def test_sigterm_lets_open_stream_finish_then_exits_zero():
    async with _proxy_over_emulator() as (_, proc, url):
        events = await _stream_events(url, 200, lambda: proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) == 200
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientError):
                async with client.get(f"{url}/health") as r:
                    await r.read()
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_stream_outlasting_the_grace_period_ends_with_an_error_event():
    # 2,000 tokens at 0.9 ms each outlast a 0.3 s grace: the proxy must end the stream, not cut it.
    async with _proxy_over_emulator("--shutdown-grace", "0.3") as (emu, proc, url):
        events = await _stream_events(url, 2000, lambda: proc.send_signal(signal.SIGTERM))
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
        assert len(events) < 2000
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        deadline = asyncio.get_running_loop().time() + 10
        while emu.engine.block_pool.num_referenced_blocks():  # the upstream request was cancelled too
            assert asyncio.get_running_loop().time() < deadline, "emulator blocks still referenced"
            await asyncio.sleep(0.01)
