"""What a new user reads first says what is there (issue #25, item 6): help texts list every
subcommand and every policy tunable with its default, a URL missing or doubling /v1 gets the fix,
the start-up lines give the SDK's base URL and how to see requests, the default output folder is
ignored by git. Real CLIs and a real proxy with embedded emulators on loopback."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from emulator import EmulatorConfig, start_emulator
from loadgen.config import RunConfig
from proxy.config import ProxyConfig
from proxy.routing.policies import policy_tunables
from proxy import start_proxy

from ..kv_events.helpers import eventually
from .test_usage_errors import _assert_one_line, _run

ROOT = Path(__file__).resolve().parents[2]


def test_loadgen_help_names_every_subcommand():
    from loadgen.__main__ import build_parser

    rc, out, _ = _run("loadgen", "--help")
    listed = re.search(r"\{([\w,-]+)\}", out).group(1).split(",")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert rc == 0 and listed == list(sub.choices)
    assert {"run", "compare", "sweep", "sweep-table", "simulate"} <= set(listed)


def test_policy_tunables_with_defaults_in_help_and_in_the_error():
    rc, out, _ = _run("proxy", "--help")
    flat = " ".join(out.split())
    tunables = policy_tunables()
    assert rc == 0 and set(tunables) >= {"kv_aware", "sglang"}
    for pol, names in tunables.items():
        for name, default in names.items():
            assert f"{name}={default:g}" in flat, (pol, name)
    rc, _, err = _run("proxy", "--policy-param", "kv_aware.decode_wieght=1")
    _assert_one_line(rc, err, "proxy", "--policy-param", "kv_aware has no tunable 'decode_wieght'",
                     f"decode_weight={tunables['kv_aware']['decode_weight']:g}")


async def test_start_up_lines_and_404s_point_at_v1():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--port", "0", "--emulators", "1", "--time-scale", "0.01", "--log-level",
        "warning", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        second = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = first.split("listening on", 1)[1].split()[0]
        assert f"OpenAI base URL for clients and SDKs: {url}/v1" in second and "add --access-log" in second
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/completions", json={"prompt": "hi"}) as r:
                body = await r.json()
            assert r.status == 404 and "the OpenAI routes are under /v1: POST /v1/completions" in body["error"]["message"]
            async with s.get(url + "/v1/v1/models") as r:
                body = await r.json()
            assert r.status == 404 and "/v1 appears twice" in body["error"]["message"]
            assert f"base_url={url}/v1" in body["error"]["message"]
            async with s.get(url + "/v1/models") as r:
                assert r.status == 200
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


async def test_a_backend_given_with_v1_is_told_to_drop_it():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    p = await start_proxy(ProxyConfig(port=0, backends=[em.url + "/v1"], health_interval=0.05, log_level="warning"))
    try:
        backend = next(iter(p.router.registry))
        await eventually(lambda: backend.last_error is not None, timeout=30, what="a health error")
        assert f"the backend URL ends in /v1: give the server's root, {em.url}" in backend.last_error
    finally:
        await p.stop()
        await em.stop()


def test_the_default_output_folder_is_ignored_by_git():
    out = RunConfig().out
    r = subprocess.run(["git", "check-ignore", "-q", f"{out}/report.md"], cwd=ROOT, timeout=30)
    assert r.returncode == 0, f"{out}/ is not in .gitignore"
