"""`python -m proxy --workers 2`: two real worker processes on one port, answering as one proxy."""
from __future__ import annotations

import os
import signal
import subprocess

import aiohttp
import pytest

from tests.reliability.helpers import ServerProcess, metric_samples, wait_for_async

DOC = "Shared document. " + " ".join(f"w{i}" for i in range(300))


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.fixture
def workers():
    p = ServerProcess("proxy", ["--workers", "2", "--port", "0", "--emulators", "2", "--time-scale", "0.01",
                                "--replica-heartbeat", "0.25"], "listening on")
    yield p
    p.stop()


async def fresh(method: str, url: str, **kw) -> tuple[int, dict, dict | str]:
    """One request on its own connection, so the kernel may hand it to either worker."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.request(method, url, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, dict(r.headers), body


async def test_two_workers_serve_one_port_as_one_proxy(workers):
    assert len(children(workers.proc.pid)) == 2
    url = workers.url
    n = 24

    async def propagated() -> bool:  # each worker has heard everything the other one published so far
        seen = {}
        for _ in range(12):  # fresh connections: the kernel spreads them over both workers
            r = (await fresh("GET", url + "/admin/backends"))[2]["replicas"]
            seen[r["epoch"]] = (r["next_seq"], {p["epoch"]: (p["synced"], p["last_seq"]) for p in r["peers"]})
        return len(seen) == 2 and all(
            other[1].get(epoch) == (True, next_seq - 1)
            for epoch, (next_seq, _) in seen.items() for e2, other in seen.items() if e2 != epoch)

    for i in range(n):
        status, headers, body = await fresh("POST", url + "/v1/completions", json={"prompt": f"{DOC} q{i}", "max_tokens": 2})
        assert status == 200, (i, body)
        if i == 0:
            await wait_for_async(propagated, what="the first request's facts applied by the other worker")
        elif i < 6:  # the document's blocks are known to whichever worker takes the request (later, kv_aware
            assert int(headers["x-kvroute-matched-blocks"]) >= 20, (i, headers)  # may copy the hot document)

    async def answered_by_both() -> bool:
        _, _, text = await fresh("GET", url + "/metrics")
        return metric_samples(text, "kvroute_workers_answering")[()] == 2

    await wait_for_async(answered_by_both, what="both workers answering /metrics")

    async def same_index() -> bool:
        seen = {tuple(b["indexed_blocks"] for b in (await fresh("GET", url + "/admin/backends"))[2]["backends"])
                for _ in range(6)}
        return len(seen) == 1

    await wait_for_async(same_index, what="both workers with one index")
    for _ in range(4):  # whichever worker answers, it counts every request
        _, _, text = await fresh("GET", url + "/metrics")
        assert sum(metric_samples(text, "kvroute_requests_total").values()) == n

    # An admin change made on one worker reaches the other.
    status, _, body = await fresh("PUT", url + "/admin/strategy", json={"strategy": "round_robin"})
    assert status == 200

    async def all_round_robin() -> bool:
        got = [(await fresh("GET", url + "/admin/strategy"))[2]["strategy"] for _ in range(6)]
        return set(got) == {"round_robin"}

    await wait_for_async(all_round_robin, what="both workers on round_robin")

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(30) == 0


async def test_a_dead_worker_stops_the_proxy_non_zero(workers):
    (first, second) = children(workers.proc.pid)
    os.kill(first, signal.SIGKILL)
    try:
        assert workers.proc.wait(30) == 1
    except subprocess.TimeoutExpired:
        pytest.fail("the parent kept running with a dead worker")
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
