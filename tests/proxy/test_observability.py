"""What operators read: the proxy's metrics count the right things, and its logs are one format.

Real proxy and emulators on loopback; the log test runs `python -m proxy` as a subprocess, as `make run` does.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from emulator.config import EmulatorConfig
from emulator.server import start_emulator

from .conftest import MODEL, TIME_SCALE

ROOT = Path(__file__).resolve().parents[2]


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not want or f"{{{want}}}" in line or all(f'{k}="{v}"' in line for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_rejected_counts_client_requests_not_admin_errors(proxy):
    async with aiohttp.ClientSession() as s:
        async with s.put(proxy.url + "/admin/strategy", json={"strategy": "nope"}) as r:
            assert r.status == 400
        async with s.delete(proxy.url + "/admin/backends", json={"url": "http://nowhere:1"}) as r:
            assert r.status >= 400
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
        assert _sample(text, "kvroute_rejected_total") == 0
        async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": ""}) as r:
            assert r.status == 400
        async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}) as r:
            assert r.status == 200
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
        assert _sample(text, "kvroute_rejected_total", status="400") == 1
        # Latency buckets double up to the idle timeout: no 160 -> 640 s jump.
        assert 'kvroute_request_latency_seconds_bucket{le="320.0"' in text


async def _read_url(proc: asyncio.subprocess.Process) -> str:
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "proxy exited before listening"
        if "listening on" in line:
            return line.split("listening on", 1)[1].split()[0]


async def test_one_log_format_with_access_lines_and_stdlib_warnings():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--port", "0", "--backend", em.url, "--backend", dead_url, "--log-format",
        "json", "--access-log", "--health-interval", "0.2", "--time-scale", str(TIME_SCALE), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        url = await _read_url(proc)
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hello " * 40, "max_tokens": 2},
                              headers={"x-request-id": "req-42"}) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        await em.stop()
    assert proc.returncode == 0, err.decode()[-2000:]
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]  # every line is JSON
    loggers = {r["logger"] for r in records}
    assert all(name.startswith("kvroute.") for name in loggers), loggers
    access = [r for r in records if r["logger"] == "kvroute.proxy.access"]
    assert len(access) == 1
    line = access[0]
    assert (line["backend"], line["status"], line["request_id"], line["strategy"]) == (em.url, 200, "req-42", "kv_aware")
    assert line["matched_blocks"] == 0 and line["latency_s"] > 0
    # The dead backend's warning comes from a stdlib logger, rendered by the same stack.
    assert any(r["level"] == "warning" and dead_url in r["event"] for r in records), records


async def test_a_failure_with_no_other_backend_does_not_claim_a_retry(caplog):
    from proxy.config import ProxyConfig
    from proxy.app import start_proxy

    em = await start_emulator(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, fault_error_rate=1.0))
    proxy = await start_proxy(ProxyConfig(port=0, backends=[em.url], retries=1, time_scale=TIME_SCALE,
                                          breaker_failures=100))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}) as r:
                assert r.status == 503
    finally:
        await proxy.stop()
        await em.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "kvroute.proxy"]
    assert any("no other healthy backend to retry on" in m for m in messages), messages
    assert not any("retrying on another backend" in m for m in messages)
