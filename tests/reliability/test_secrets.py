"""Nothing secret in any output (issue #24): a `python -m proxy` run with every kind of secret configured
(client API keys, the admin key from a file, a backend API key), driven through success, every error
path and the admin API; then every response head and body, /metrics, the admin answers and the
process's whole log (debug level, access log on) are searched for each secret."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys

from .helpers import ROOT

CLIENT_KEY = "sk-client-SECRET-a81f"
ADMIN_KEY = "adm-SECRET-file-77d2"
BACKEND_KEY = "be-SECRET-3c9e"
URL_SECRET = "url-SECRET-pw-0b4d"
SECRETS = (CLIENT_KEY, ADMIN_KEY, BACKEND_KEY, URL_SECRET)


class GuardedBackend:
    """A backend that, like `vllm serve --api-key`, refuses any request without the proxy's key."""

    def __init__(self) -> None:
        self.unauthorised = 0

    async def start(self) -> GuardedBackend:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next((int(ln.split(b":")[1]) for ln in lines if ln.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                if b"authorization: bearer " + BACKEND_KEY.lower().encode() not in head.lower():
                    self.unauthorised += 1
                    answer, status = b'{"error": "unauthorized"}', b"401 Unauthorized"
                elif lines[0].startswith(b"GET /v1/models"):
                    answer, status = b'{"object":"list","data":[{"id":"m","object":"model","max_model_len":4096}]}', b"200 OK"
                elif lines[0].startswith(b"GET"):
                    answer, status = b"{}", b"200 OK"
                elif b'"stream": true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for e in (b'data: {"choices":[{"index":0,"text":"hi"}]}\n\n', b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%b\r\n" % (len(e), e))
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    continue
                else:
                    answer, status = b'{"choices":[{"index":0,"text":"hi"}],"usage":{"prompt_tokens":3}}', b"200 OK"
                writer.write(b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (status, len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(-1), 15)
    finally:
        writer.close()


def req(method: str, path: str, body: object = None, auth: str | None = None, extra: str = "") -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}"
    if auth is not None:
        head += f"Authorization: Bearer {auth}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


async def test_no_secret_reaches_headers_metrics_admin_answers_logs_or_errors(tmp_path):
    fake = await GuardedBackend().start()
    key_file = tmp_path / "admin_key"
    key_file.write_text(ADMIN_KEY + "\n")
    log_path = tmp_path / "proxy.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    env.update(KVROUTE_BACKEND_API_KEY=BACKEND_KEY, KVROUTE_API_KEY=CLIENT_KEY, PYTHONPATH=ROOT)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--port", "0", "--backend", fake.url, "--admin-key-file", str(key_file),
             "--log-level", "debug", "--access-log", "--log-format", "json", "--health-interval", "0.2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    outputs: list[bytes] = []
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        outputs.append(line.encode())
        port = int(line.split("http://")[1].split()[0].rstrip(",;)").rsplit(":", 1)[1])
        completion = {"prompt": "hello there", "max_tokens": 2}
        for raw in (
            req("POST", "/v1/completions", completion, CLIENT_KEY),
            req("POST", "/v1/completions", {**completion, "stream": True}, CLIENT_KEY),
            req("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, CLIENT_KEY),
            req("POST", "/v1/completions", completion, CLIENT_KEY + "x"),
            req("POST", "/v1/completions", completion),
            req("POST", "/v1/completions", {"prompt": 5}, CLIENT_KEY),
            req("POST", "/v1/completions", completion, CLIENT_KEY, "Transfer-Encoding: chunked\r\n").replace(
                b"Content-Length", b"X-Was"),
            req("POST", "/tokenize", {"prompt": "hi"}, CLIENT_KEY),
            req("GET", "/version", None, CLIENT_KEY),
            req("GET", "/v1/models", None, CLIENT_KEY),
            req("GET", "/health"),
            req("GET", "/metrics"),
            req("GET", "/admin/backends"),
            req("GET", "/admin/backends", None, ADMIN_KEY + "x"),
            req("GET", "/admin/backends", None, ADMIN_KEY),
            req("POST", "/admin/backends", {"url": f"http://admin:{URL_SECRET}@127.0.0.1:9"}, ADMIN_KEY),
            req("POST", "/admin/backends", {"url": f"http://127.0.0.1:9/?token={URL_SECRET}"}, ADMIN_KEY),
            req("PUT", "/admin/strategy", {"strategy": "no-such-policy"}, ADMIN_KEY),
            req("POST", "/admin/reset", None, ADMIN_KEY),
            req("GET", "/admin/strategy", None, ADMIN_KEY),
            b"GARBAGE " + CLIENT_KEY.encode() + b"\r\n\r\n",
        ):
            outputs.append(await exchange(port, raw))
        assert fake.unauthorised == 0  # the proxy sent its backend key everywhere, so the checks above ran
        assert b"kvroute_requests_total" in outputs[12] and b'"backends"' in outputs[15]
        # A backend that rejects the proxy's key: its error path, and the monitor's, must not print it either.
        fake_key = BACKEND_KEY
        globals()["BACKEND_KEY"] = "rotated"
        try:
            outputs.append(await exchange(port, req("POST", "/v1/completions", completion, CLIENT_KEY)))
            outputs.append(await exchange(port, req("GET", "/admin/backends", None, ADMIN_KEY)))
        finally:
            globals()["BACKEND_KEY"] = fake_key
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        fake.server.close()
    outputs.append(out.encode())
    outputs.append(log_path.read_bytes())
    assert b"502" in outputs[-4]  # the rotated-key request was refused upstream and answered
    everything = b"\n".join(outputs)
    assert len(outputs[-1]) > 1000, "the debug log should have said something"
    for s in SECRETS:
        for form in (s.encode(), base64.b64encode(s.encode()), s.lower().encode()):
            assert form not in everything, (s, everything[max(0, everything.find(form) - 300): everything.find(form) + 100])
