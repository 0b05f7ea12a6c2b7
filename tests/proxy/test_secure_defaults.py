"""Secure defaults (issue #24): who may call the admin API, what a backend URL may be, no redirects followed."""
from __future__ import annotations

import ast
import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.backend_url import BadBackendURL, check_backend_url
from proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("url, expected", [
    ("127.0.0.1:8001", "http://127.0.0.1:8001"),
    ("HTTP://Gw.Example:80/vllm-a/", "http://gw.example:80/vllm-a"),
    ("https://vllm.internal/team.a/v_1", "https://vllm.internal/team.a/v_1"),
    ("http://[::1]:8001", "http://[::1]:8001"),
])
def test_backend_urls_that_are_accepted(url, expected):
    assert check_backend_url(url) == expected


@pytest.mark.parametrize("url, says", [
    ("http://user:hunter2@host:80", "credentials"),
    ("http://token@host", "credentials"),
    ("http://host:80/x?token=hunter2", "query"),
    ("http://host:80/#hunter2", "query or fragment"),
    ("http://host:80/a/../admin", "path prefix"),
    ("http://host:80/a//b", "path prefix"),
    ("http://host:80/%2e%2e", "path prefix"),
    ("ftp://host", "scheme"),
    ("http://host:0", "port"),
    ("http://host:" + "9" * 2000, "port"),
    ("http://host/" + "a" * 5000, "at most"),
    ("http://ho st", "printable"),
    ("http://", "no host"),
    ("http://-bad-:80", "host name"),
])
def test_backend_urls_that_are_refused_never_echo_a_secret(url, says):
    with pytest.raises(BadBackendURL) as e:
        check_backend_url(url)
    assert says in str(e.value) and "hunter2" not in str(e.value)


def test_cli_refuses_credentials_in_a_backend_url_naming_the_flag():
    r = subprocess.run([sys.executable, "-m", "proxy", "--port", "0", "--backend", "http://u:hunter2@127.0.0.1:9"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "--backend" in line and "--backend-api-key" in line and "hunter2" not in line


def test_admin_key_from_a_file(tmp_path):
    f = tmp_path / "key"
    f.write_text("  k-from-file \n")
    assert ProxyConfig.from_cli(["--admin-key-file", str(f)], env={}).admin_key == "k-from-file"
    assert ProxyConfig.from_cli([], env={"KVROUTE_ADMIN_KEY_FILE": str(f)}).admin_key == "k-from-file"
    assert ProxyConfig.from_cli([], env={"KVROUTE_ADMIN_KEY": "k-env"}).admin_key == "k-env"
    assert "k-from-file" not in repr(ProxyConfig(admin_key_file=str(f)))
    (tmp_path / "empty").write_text("\n")
    for argv, flag in ((["--admin-key-file", str(tmp_path / "nope")], "--admin-key-file"),
                       (["--admin-key-file", str(tmp_path / "empty")], "--admin-key-file"),
                       (["--admin-key-file", str(f), "--admin-key", "x"], "--admin-key")):
        r = subprocess.run([sys.executable, "-m", "proxy", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and flag in r.stderr and "k-from-file" not in r.stderr, r.stderr


async def _admin_status(url: str, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/backends", headers=headers or {}) as r:
            body = await r.json()
            assert r.content_type == "application/json" and (r.status == 200 or body["error"]["code"] == r.status)
            return r.status


async def test_admin_api_open_on_loopback_only_and_keyed_or_disabled_elsewhere(make_proxy, emulators, caplog):
    backends = [e.url for e in emulators[:1]]
    with caplog.at_level(logging.WARNING, logger="kvroute.proxy"):
        local = await make_proxy(backends=backends)
    assert any("open to every local user" in r.getMessage() for r in caplog.records)
    assert await _admin_status(local.url) == 200
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvroute.proxy"):
        wide = await make_proxy(backends=backends, host="0.0.0.0")
    assert any("admin API (/admin/) is disabled" in r.getMessage() for r in caplog.records)
    assert await _admin_status(wide.url) == 403
    assert await _admin_status(wide.url, {"Authorization": "Bearer anything"}) == 403
    keyed = await make_proxy(backends=backends, host="0.0.0.0", admin_key="k-123")
    assert await _admin_status(keyed.url) == 401
    assert await _admin_status(keyed.url, {"Authorization": "Bearer k-124"}) == 401
    assert await _admin_status(keyed.url, {"Authorization": "Bearer k-123"}) == 200


async def test_admin_added_backends_are_checked_like_configured_ones(make_proxy, emulators):
    proxy = await make_proxy(backends=[emulators[0].url])
    async with aiohttp.ClientSession() as s:
        for bad in ("http://u:hunter2@127.0.0.1:9", "http://127.0.0.1:9/x?secret=hunter2", "http://127.0.0.1:9/../x",
                    "gopher://127.0.0.1:9", 7, None):
            async with s.post(proxy.url + "/admin/backends", json={"url": bad}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "url", body
                assert "hunter2" not in str(body)
    assert [b.url for b in proxy.router.registry] == [emulators[0].url]


async def test_runtime_backend_additions_can_be_forbidden(make_proxy, emulators):
    proxy = await make_proxy(backends=[e.url for e in emulators[:2]], runtime_backends=False)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/backends", json={"url": emulators[3].url}) as r:
            assert r.status == 403 and "--no-runtime-backends" in (await r.json())["error"]["message"]
        async with s.delete(proxy.url + "/admin/backends", json={"url": emulators[1].url}) as r:
            assert r.status == 200
    assert [b.url for b in proxy.router.registry] == [emulators[0].url]


class _Redirector:
    """A backend that answers every route with a redirect to `target`; counts what reaches `target`."""

    def __init__(self) -> None:
        self.target_hits = 0

    async def start(self) -> _Redirector:
        self.target = await asyncio.start_server(self._target, "127.0.0.1", 0)
        self.server = await asyncio.start_server(self._redirect, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _target(self, reader, writer) -> None:
        self.target_hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"stolen\": true}\n")
        await writer.drain()
        writer.close()

    async def _redirect(self, reader, writer) -> None:
        port = self.target.sockets[0].getsockname()[1]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d/x\r\nContent-Length: 0\r\n\r\n" % port)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()
        self.target.close()


async def test_no_backend_redirect_is_followed(make_proxy):
    red = await _Redirector().start()
    try:
        proxy = await make_proxy(backends=[red.url], health_interval=0.1)
        async with aiohttp.ClientSession() as s:
            for method, path, body in (("POST", "/tokenize", {"prompt": "hi"}), ("GET", "/version", None),
                                       ("GET", "/v1/models", None), ("POST", "/admin/reset", None),
                                       ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1})):
                async with s.request(method, proxy.url + path, json=body, allow_redirects=False) as r:
                    assert b"stolen" not in await r.read(), path
        assert red.target_hits == 0
    finally:
        red.close()


def test_every_aiohttp_call_in_the_proxy_refuses_redirects():
    """Static: each session.get/post/request(...) under proxy/ passes allow_redirects=False."""
    calls = []
    for path in (ROOT / "proxy").rglob("*.py"):
        if path.name.startswith(("bench", "soak")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "post", "put", "delete", "request")
                    and "session" in ast.unparse(node.func.value)):
                calls.append((path.name, node.lineno, any(k.arg == "allow_redirects" and ast.unparse(k.value) == "False"
                                                          for k in node.keywords)))
    assert len(calls) >= 7
    assert all(ok for _, _, ok in calls), [c for c in calls if not c[2]]
