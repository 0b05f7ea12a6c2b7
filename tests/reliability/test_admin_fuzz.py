"""Fuzz of the admin API's inputs (issue #24): every answer is JSON (a success or an OpenAI-style 4xx),
never a 500 or a hang; only URLs a configured --backend could be are ever added, and the proxy's
resources (fds, tasks, in-flight) come back once the fuzzing stops.

Added backends are pinned to loopback hosts (fuzzed ports, paths, queries, credentials): a fuzzed
host name would make the proxy resolve and call it, which a test must not do.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.edge.admin import MAX_BACKENDS
from proxy.backend_url import BadBackendURL, check_backend_url
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .test_fuzz import LoopThread, json_values

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
ADMIN_KEY = "adm-fuzz-SECRET-5e1d"
ROUTES = [("GET", "/admin/backends"), ("POST", "/admin/backends"), ("DELETE", "/admin/backends"),
          ("GET", "/admin/strategy"), ("PUT", "/admin/strategy"), ("POST", "/admin/reset")]


@pytest.fixture(scope="module")
def servers():
    lt = LoopThread()

    async def up():
        ems = await start_emulators(EmulatorConfig(port=0, time_scale=0.001, log_requests=False), 1)
        proxy = await start_proxy(ProxyConfig(port=0, backends=[ems[0].url], time_scale=0.001, health_interval=5,
                                              admin_key=ADMIN_KEY, connect_timeout=0.5))
        return ems, proxy

    ems, proxy = lt.run(up())

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    state = {"proxy": proxy, "emulator": ems[0].url, "lt": lt, "fds": len(os.listdir("/proc/self/fd")),
             "tasks": lt.run(tasks()), "count_tasks": lambda: lt.run(tasks())}
    yield state

    async def down():
        await proxy.stop()
        await ems[0].stop()

    lt.run(down())
    lt.close()


def call(url: str, method: str, path: str, body: bytes | None, auth: str | None) -> tuple[int, dict]:
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        assert r.getheader("Content-Type", "").startswith("application/json"), (method, path, r.status, data[:200])
        return r.status, json.loads(data)
    finally:
        c.close()


loopback_urls = st.builds(
    lambda scheme, userinfo, port, path, query: f"{scheme}://{userinfo}127.0.0.1{port}{path}{query}",
    st.sampled_from(["http", "https", "HTTP", "ftp", "javascript", ""]).map(lambda s: s or "http"),
    st.sampled_from(["", "", "user@", "user:pw@", "@", ":@"]),
    st.sampled_from(["", ":1", ":9", ":65535", ":0", ":99999", ":-1", ":x", ":" + "9" * 30]),
    st.text(st.sampled_from("/abc.-_~%?#@:. \t"), max_size=20).map(lambda p: "/" + p if p else ""),
    st.sampled_from(["", "?x=1", "#frag", "?"]),
)
url_values = loopback_urls | json_values
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"url": url_values, "strategy": st.sampled_from(["kv_aware", "round_robin"]) | json_values}),
    json_values, st.binary(max_size=64), st.just(None),
)
auths = st.sampled_from([f"Bearer {ADMIN_KEY}"] * 4 + [None, "Bearer ", f"bearer {ADMIN_KEY}", f"Basic {ADMIN_KEY}",
                                                     f"Bearer {ADMIN_KEY}x", "Bearer \u00e9"])


@FUZZ
@given(route=st.sampled_from(ROUTES), body=bodies, auth=auths, query_url=st.none() | loopback_urls)
def test_admin_api_answers_every_input_with_json_and_adds_only_valid_backends(servers, route, body, auth, query_url):
    proxy = servers["proxy"]
    method, path = route
    if query_url is not None:
        path += "?url=" + quote(query_url, safe="")
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if auth is not None and not auth.isascii():
        auth = auth.encode("utf-8").decode("latin-1")
    status, data = call(proxy.url, method, path, raw, auth)
    assert status in (200, 201, 400, 401, 403, 404, 413), (status, data)
    if status >= 400:
        err = data["error"]
        assert err["code"] == status and isinstance(err["message"], str) and ADMIN_KEY not in err["message"]
    if auth != f"Bearer {ADMIN_KEY}" and (auth or "").lower() != f"bearer {ADMIN_KEY}".lower():
        assert status == 401
    urls = [b.url for b in proxy.router.registry]
    assert len(urls) <= MAX_BACKENDS
    for u in urls:
        assert check_backend_url(u) == u and "@" not in u and "?" not in u and "#" not in u
    # Keep the registry to the emulator (a fuzzed backend would be health-checked on every round).
    for u in urls:
        if u != servers["emulator"]:
            call(proxy.url, "DELETE", "/admin/backends?url=" + quote(u, safe=""), None, f"Bearer {ADMIN_KEY}")
    if servers["emulator"] not in [b.url for b in proxy.router.registry]:
        call(proxy.url, "POST", "/admin/backends", json.dumps({"url": servers["emulator"]}).encode(), f"Bearer {ADMIN_KEY}")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(url=st.text(max_size=60) | loopback_urls)
def test_backend_url_check_is_total_and_idempotent(url):
    try:
        out = check_backend_url(url)
    except BadBackendURL:
        return
    assert check_backend_url(out) == out and "@" not in out and "?" not in out and "#" not in out


def test_resources_come_back_after_the_fuzz(servers):
    """Runs after the fuzz above (file order): fds, tasks and in-flight back to where they were."""
    proxy = servers["proxy"]
    assert proxy.context.admission.in_flight == 0
    assert sum(b.in_flight for b in proxy.router.registry) == 0
    assert len(os.listdir("/proc/self/fd")) <= servers["fds"] + 4  # pooled backend connections
    assert servers["count_tasks"]() <= servers["tasks"] + 2
