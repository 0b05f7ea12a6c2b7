"""The load generator through a router that is not kvroute, as sglang-router behaves: `/v1/models`
says `unknown` and responses name no backend. Real emulators and a real (tiny) forwarding router on
loopback; the client is the real openai SDK."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from emulator.config import EmulatorConfig
from emulator.server import start_emulator
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.peer import ModelUnknown
from loadgen.proxy_admin import AdminError
from loadgen.runner import run_workload
from loadgen.summary import summarize
from loadgen.sweep import SLO, PeerRouter, sweep, sweep_table
from loadgen.workloads import build_workload

from .conftest import FAST, MECHANICS_ONLY


async def _peer_router(backends: list[str]) -> tuple[web.AppRunner, str]:
    """Round robin over `backends`, streaming through, model `unknown`, no kvroute headers."""
    turn = itertools.count()
    session = aiohttp.ClientSession()

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "unknown", "object": "model"}]})

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = backends[next(turn) % len(backends)] + request.path
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", forward)
    app.router.add_post("/v1/chat/completions", forward)
    app.on_cleanup.append(lambda _: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def peer():
    ems = [await start_emulator(EmulatorConfig(port=0, time_scale=FAST)) for _ in range(2)]
    runner, target = await _peer_router([e.url for e in ems])
    try:
        yield target, [e.url for e in ems]
    finally:
        await runner.cleanup()
        for e in ems:
            await e.stop()


def _cfg(target: str, **run) -> RunConfig:
    wl = WorkloadConfig(name="rag", requests=8, output_tokens=8, question_tokens=16, documents=2,
                        doc_tokens_min=200, doc_tokens_max=300)
    return RunConfig(target=target, time_scale=FAST, progress=False, metrics_interval=0.05, concurrency=2,
                     workload=wl, **{**MECHANICS_ONLY, **run})


async def test_unknown_model_without_backends_is_a_clear_error(peer):
    target, _ = peer
    cfg = _cfg(target)
    with pytest.raises(ModelUnknown, match="--model"):
        await run_workload(build_workload(cfg.workload), cfg, [])


async def test_through_a_peer_router_the_model_and_per_backend_table_come_from_the_backends(peer):
    target, backends = peer
    cfg = _cfg(target)
    res = await run_workload(build_workload(cfg.workload), cfg, backends)
    assert res.model != "unknown" and res.model
    s = summarize(res)
    assert s["ok"] == 8 and s["errors"] == 0
    assert set(s["per_backend"]) == set(backends)  # not one "(none)" row
    assert sorted(d["requests"] for d in s["per_backend"].values()) == [4, 4]  # the router's round robin
    assert sum(d["cached_tokens"] for d in s["per_backend"].values()) == s["cached_tokens"]
    assert s["load_imbalance"] == pytest.approx(1.0)
    assert s["prediction"] is None  # no x-kvroute-matched-blocks to judge


async def test_an_explicit_model_needs_no_backends(peer):
    target, backends = peer
    cfg = _cfg(target, model=(await _first_model(backends[0])))
    res = await run_workload(build_workload(cfg.workload), cfg, [])
    assert summarize(res)["ok"] == 8


async def _first_model(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
        return (await r.json())["data"][0]["id"]


async def test_a_sweep_through_a_peer_router_resets_its_backends_and_joins_the_table(peer, stack, tmp_path):
    """`sweep --peer`: the other router is the one strategy; between points the backends' caches are
    reset on the backends (the same prompts at the next rate start cold); `sweep-table` puts its
    goodput in the row of the kvroute sweep of the same workload."""
    target, backends = peer
    cfg = replace(_cfg(target, out=str(tmp_path / "peer")), concurrency=0)
    res = await sweep(cfg, [], [4.0, 8.0], target, spawn="inprocess", slo=SLO(ttft_p99=1e9, tpot_p50=1e9),
                      keep_records=True, peer=PeerRouter("rr-router", backends))
    assert list(res.points) == ["rr-router"] and res.goodput == {"rr-router": 8.0}
    for rate in ("4", "8"):
        first = json.loads((tmp_path / "peer" / "rr-router" / f"rate-{rate}" / "records.jsonl").read_text().splitlines()[0])
        assert first["ok"] and first["cached_tokens"] == 0, (rate, first)  # cold: reset in between
    report = (tmp_path / "peer" / "report.md").read_text()
    assert "`rr-router` (another router) ran the seeded workload" in report and "not kvroute" in report
    ours = replace(cfg, target=stack, out=str(tmp_path / "ours"))
    await sweep(ours, ["kv_aware", "round_robin"], [4.0, 8.0], stack, slo=SLO(ttft_p99=1e9, tpot_p50=1e9))
    table = sweep_table([tmp_path / "ours", tmp_path / "peer"])
    assert "| rr-router |" in table[0] and len(table) == 3, table
    assert table[2].startswith("| `rag` | 4,8 req/s | **8** | **8** | **8** | highest |"), table


async def test_a_peer_reset_that_a_backend_refuses_names_it(peer):
    target, backends = peer
    with pytest.raises(AdminError, match=r"/reset_prefix_cache -> HTTP 404"):
        await PeerRouter("rr-router", [target]).reset()  # the router itself has no such route
