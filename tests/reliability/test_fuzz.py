"""Property-based fuzzing of request bodies and headers against a real emulator and a real proxy.

Every answer must be a success or a well-formed OpenAI-style 4xx error ({"error": {...}}): never a
500, never a hang (the client's timeout fails the example). The servers run on their own event
loop in a background thread so hypothesis can drive them from plain synchronous tests.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .helpers import MODEL

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
CLIENT_TIMEOUT = 10.0
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
API_KEY = "sk-fuzz-0123456789"


class LoopThread:
    """An event loop in a daemon thread, to host servers for synchronous hypothesis tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def servers():
    """One emulator (fuzzed directly) and a proxy in front of two more, all on loopback, port 0."""
    lt = LoopThread()
    cfg = EmulatorConfig(port=0, time_scale=0.001, log_requests=False, max_model_len=4096)

    async def up():
        ems = await start_emulators(cfg, 3)
        proxy = await start_proxy(ProxyConfig(
            port=0, backends=[e.url for e in ems[1:]], time_scale=0.001, health_interval=0.5, api_keys=[API_KEY],
        ))
        return ems, proxy

    ems, proxy = lt.run(up())
    yield {"emulator": ems[0].url, "proxy": proxy.url}

    async def down():
        await proxy.stop()
        for e in ems:
            await e.stop()

    lt.run(down())
    lt.close()


# -- strategies ------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-5, 5000)
FIELDS = {
    "model": st.just(MODEL) | json_values,
    "prompt": st.text(min_size=0, max_size=200) | st.lists(st.integers(-3, 200_000), max_size=40) | st.lists(st.text(max_size=20), max_size=3) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values,
                                                "content": st.text(max_size=100) | json_values}), max_size=3) | json_values,
    "max_tokens": small_ints | json_values,
    "max_completion_tokens": small_ints | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
    "seed": small_ints | json_values,
    "echo": st.booleans() | json_values,
    "min_tokens": small_ints | json_values,
    "stop_token_ids": st.lists(st.integers(-3, 200_000), max_size=3) | json_values,
    "cache_salt": st.text(max_size=8) | json_values,
    "logprobs": st.integers(-1, 5) | st.booleans() | json_values,
    "ignore_eos": st.booleans() | json_values,
}
structured = st.fixed_dictionaries({}, optional=FIELDS).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    structured,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
)
VALID_BODY = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 3}).encode()
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te", "keep-alive", "trailer"}
header_names = st.text(TOKEN_CHARS, min_size=1, max_size=30).filter(lambda n: n.lower() not in FRAMING)
header_values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=50)  # sent as latin-1
    | st.text(st.characters(min_codepoint=0x80, max_codepoint=0xFF), min_size=1, max_size=8)
    | st.integers(8000, 70_000).map(lambda n: "v" * n)
)
headers_st = st.dictionaries(
    header_names | st.sampled_from(["Content-Type", "Authorization", "X-Request-ID", "x-kvroute-strategy", "Accept-Encoding", "Cookie"] * 3),
    header_values, max_size=6,
)


@dataclass
class Answer:
    status: int
    content_type: str
    content: bytes


def check_answer(r: Answer) -> None:
    """A success, or a 4xx (never 5xx from bad input) carrying OpenAI-style error JSON."""
    assert r.status < 500, (r.status, r.content[:300])
    if r.status >= 400:
        assert r.content_type.startswith("application/json"), (r.status, r.content_type, r.content[:300])
        body = json.loads(r.content)
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), r.content[:300]
        err = body["error"]
        assert isinstance(err.get("message"), str) and err["message"]
        assert "Traceback" not in err["message"] and "/work/" not in err["message"]
        assert API_KEY.encode() not in r.content
    else:
        assert r.status == 200, r.status
        if r.content_type.startswith("text/event-stream"):
            assert r.content.rstrip().endswith(b"data: [DONE]"), r.content[-200:]
        else:
            assert "choices" in json.loads(r.content)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
    """One POST on a fresh connection; the socket timeout fails a hang."""
    u = urlsplit(url)
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    for k, v in (headers or {}).items():
        h = {key: val for key, val in h.items() if key.lower() != k.lower()}
        h[k] = v
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=CLIENT_TIMEOUT)
    try:
        try:
            conn.request("POST", u.path, body=body, headers=h)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered a refused header before reading the body, then closed: read its answer
        r = conn.getresponse()
        return Answer(r.status, r.getheader("Content-Type", ""), r.read())
    finally:
        conn.close()


@pytest.mark.parametrize("target", ["emulator", "proxy"])
def test_fuzzed_bodies_get_success_or_openai_error(servers, target):
    @FUZZ
    @given(body=bodies, endpoint=st.sampled_from(ENDPOINTS))
    def run(body, endpoint):
        check_answer(post(servers[target] + endpoint, body))

    run()


@pytest.mark.parametrize("target", ["emulator", "proxy"])
def test_fuzzed_headers_get_success_or_openai_error(servers, target):
    @FUZZ
    @given(headers=headers_st, endpoint=st.sampled_from(ENDPOINTS))
    def run(headers, endpoint):
        check_answer(post(servers[target] + endpoint, VALID_BODY, headers))

    run()
