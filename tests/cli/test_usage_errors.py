"""Every start-up mistake a user can make is one line naming the flag or env var, exit status 2, no traceback.

Each case runs the real CLI as a subprocess (`python -m proxy|emulator|loadgen`), as a user would.
Cases that need something listening (a busy port, a target that is not an OpenAI API, a model it does
not serve, emulators at another time scale) get it from real servers on loopback.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator import EmulatorConfig, start_emulator

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    full_env.update(env or {})
    p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=full_env, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    return p.returncode, p.stdout, p.stderr


async def _arun(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The same, without blocking the event loop that serves the test's emulator."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVROUTE_")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", *argv, cwd=ROOT, env=full_env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    return proc.returncode, out.decode(), err.decode()


def _assert_one_line(rc: int, err: str, prog: str, *expected: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"python -m {prog}"), lines[0]
    assert ": error: " in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture(scope="module")
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# (program, argv, env, text the line must contain) - the list and the others of their kind.
CASES = [
    ("proxy", ["--config", "/nonexistent/proxy.json"], {}, ["--config", "/nonexistent/proxy.json", "no such file"]),
    ("proxy", ["--backends-file", "/nonexistent/backends.txt"], {}, ["--backends-file", "no such file"]),
    ("proxy", ["--tokenizer", "/nonexistent"], {}, ["--tokenizer", "/nonexistent"]),
    ("proxy", ["--time-scale", "-1"], {}, ["--time-scale", "> 0"]),
    ("proxy", ["--hash-algo", "md5"], {}, ["--hash-algo", "md5", "sha256"]),
    ("proxy", ["--backend", "http://127.0.0.1:1", "--kv-events", "foo://127.0.0.1:5557"], {},
     ["--kv-events", "foo://127.0.0.1:5557", "tcp://"]),
    ("proxy", ["--kv-events", "tcp://127.0.0.1:5557"], {}, ["--kv-events", "--backend"]),
    ("proxy", ["--backend", "ftp://x"], {}, ["--backend", "ftp://x", "http://"]),
    ("proxy", ["--log-format", "xml"], {}, ["--log-format", "xml"]),
    ("proxy", ["--log-level", "loud"], {}, ["--log-level", "loud"]),
    ("proxy", ["--strategy", "fastest"], {}, ["--strategy", "fastest", "kv_aware"]),
    ("proxy", ["--port", "70000"], {}, ["--port", "65535"]),
    ("proxy", ["--retries", "x"], {}, ["--retries", "'x'"]),
    ("proxy", [], {"KVROUTE_TIME_SCALE": "abc"}, ["KVROUTE_TIME_SCALE='abc'", "number"]),
    ("proxy", [], {"KVROUTE_PORT": "-5"}, ["KVROUTE_PORT='-5'", "--port"]),
    ("proxy", [], {"KVROUTE_CONFIG": "/nonexistent.json"}, ["KVROUTE_CONFIG", "no such file"]),
    ("emulator", [], {"KVROUTE_EMU_TIME_SCALE": "abc"}, ["KVROUTE_EMU_TIME_SCALE='abc'", "number"]),
    ("emulator", ["--time-scale", "-1"], {}, ["--time-scale", "> 0"]),
    ("emulator", ["--config", "/nonexistent.json"], {}, ["--config", "no such file"]),
    ("emulator", ["--kv-events-config", "{nope"], {}, ["--kv-events-config", "JSON"]),
    ("emulator", ["--prefix-caching-hash-algo", "md5"], {}, ["--prefix-caching-hash-algo", "md5"]),
    ("emulator", [], {"KVROUTE_EMU_LOG_REQUESTS": "maybe"}, ["KVROUTE_EMU_LOG_REQUESTS='maybe'", "boolean"]),
    ("emulator", ["--kv-events-config", '{"enable_kv_cache_events": true, "endpoint": "foo://x"}'], {},
     ["--kv-events-config", "'foo://x'", "tcp://"]),
    ("loadgen", ["run", "--workload", "trace", "--trace-path", "/nonexistent.jsonl"], {},
     ["--trace-path", "/nonexistent.jsonl", "no such file"]),
    ("loadgen", ["run", "--time-scale", "-1"], {}, ["--time-scale", "positive"]),
    ("loadgen", ["run", "--target", "ftp://x/v1"], {}, ["--target", "ftp://x/v1"]),
    ("loadgen", ["run", "--backend", "ftp://x"], {}, ["--backend", "ftp://x"]),
    ("loadgen", ["run", "--max-error-share", "2"], {}, ["--max-error-share"]),
    ("loadgen", ["run", "--prefix-lengths", "a,b"], {}, ["--prefix-lengths"]),
    ("loadgen", ["run", "--documents", "0"], {}, ["--documents", ">= 1"]),
    ("loadgen", ["compare", "--backends", "0"], {}, ["--backends", ">= 1"]),
    ("loadgen", ["compare", "--strategies", "kv_aware,nope"], {}, ["--strategies", "'nope'", "kv_aware"]),
    ("loadgen", ["compare", "--target", "http://127.0.0.1:9/v1"], {}, ["--target", "--reset-target"]),
    ("loadgen", ["run"], {"KVROUTE_LOADGEN_REQUESTS": "abc"}, ["KVROUTE_LOADGEN_REQUESTS='abc'", "integer"]),
    ("loadgen", ["compare"], {"KVROUTE_LOADGEN_TIME_SCALE": "-1"}, ["KVROUTE_LOADGEN_TIME_SCALE='-1'", "--time-scale"]),
    ("loadgen", ["run", "--log-format", "xml"], {}, ["--log-format", "xml"]),
    ("loadgen", ["sweep", "--rates", "8", "--peer", "sglang-router"], {}, ["--peer", "--target"]),
    ("loadgen", ["sweep", "--rates", "8", "--backend", "http://127.0.0.1:9"], {}, ["--backend", "--peer"]),
    ("loadgen", ["sweep", "--rates", "8", "--peer", "a/b", "--target", "http://127.0.0.1:9/v1", "--backend",
                 "http://127.0.0.1:9"], {}, ["--peer", "'a/b'"]),
    ("loadgen", ["sweep", "--rates", "8", "--peer", "r", "--target", "http://127.0.0.1:9/v1", "--backend",
                 "http://127.0.0.1:9"], {}, ["--target", "--reset-target", "--backend"]),
]


@pytest.mark.parametrize("prog,argv,env,expected", CASES, ids=[f"{c[0]} {' '.join(c[1]) or c[2]}" for c in CASES])
def test_mistake_is_one_line_naming_the_flag(prog, argv, env, expected):
    rc, _out, err = _run(prog, *argv, env=env)
    _assert_one_line(rc, err, prog, *expected)


# With a --backend the proxy would start health checks before binding: the port is checked first, so still one line.
@pytest.mark.parametrize("prog,argv", [("proxy", []), ("proxy", ["--backend", "http://127.0.0.1:1"]), ("emulator", [])])
def test_port_in_use(prog, argv, busy_port):
    rc, _out, err = _run(prog, "--port", str(busy_port), *argv)
    _assert_one_line(rc, err, prog, "--port", str(busy_port), "in use")


@pytest.mark.parametrize("argv", [["run", "--requests", "5"], ["compare", "--reset-target"],
                                  ["sweep", "--rates", "8", "--reset-target"],
                                  ["sweep", "--rates", "8", "--reset-target", "--peer", "r", "--backend", "http://127.0.0.1:9"]])
def test_target_down_is_named_before_any_request(closed_port, tmp_path, argv):
    target = f"http://127.0.0.1:{closed_port}/v1"
    rc, _out, err = _run("loadgen", *argv, "--target", target, "--out", str(tmp_path))
    _assert_one_line(rc, err, "loadgen", "--target", target, "cannot reach")
    assert not (tmp_path / "records.jsonl").exists()


@pytest.fixture
async def emulator():
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False))
    try:
        yield em
    finally:
        await em.stop()


async def test_target_without_v1_gets_the_fix(emulator, tmp_path):
    rc, _out, err = await _arun("loadgen", "run", "--target", emulator.url, "--backend", emulator.url,
                                "--time-scale", "0.01", "--out", str(tmp_path))
    _assert_one_line(rc, err, "loadgen", "--target", f"use {emulator.url}/v1")


async def test_unknown_model_is_named(emulator, tmp_path):
    rc, _out, err = await _arun("loadgen", "run", "--target", emulator.url + "/v1", "--backend", emulator.url,
                                "--time-scale", "0.01", "--model", "gpt-nope", "--out", str(tmp_path))
    _assert_one_line(rc, err, "loadgen", "--model", "'gpt-nope'", "meta-llama/Llama-2-13b-hf")


async def test_time_scale_mismatch_is_caught(emulator, tmp_path):
    rc, _out, err = await _arun("loadgen", "run", "--target", emulator.url + "/v1", "--backend", emulator.url,
                                "--time-scale", "0.05", "--out", str(tmp_path))
    _assert_one_line(rc, err, "loadgen", "--time-scale", "0.05", "0.01", emulator.url)


async def test_all_requests_failing_exits_non_zero(tmp_path):
    em = await start_emulator(EmulatorConfig(port=0, time_scale=0.01, log_requests=False, fault_error_rate=1.0))
    try:
        rc, out, err = await _arun("loadgen", "run", "--target", em.url + "/v1", "--backend", em.url,
                                   "--time-scale", "0.01", "--requests", "3", "--documents", "1",
                                   "--doc-tokens-min", "100", "--doc-tokens-max", "100", "--output-tokens", "4",
                                   "--no-progress", "--out", str(tmp_path))
    finally:
        await em.stop()
    assert rc == 1, err
    assert "3 of 3 requests failed" in err and "--max-error-share" in err and "Traceback" not in err
    assert (tmp_path / "report.md").exists()


def test_config_file_value_of_the_wrong_type_names_the_key(tmp_path):
    cf = tmp_path / "proxy.json"
    cf.write_text('{"port": "abc"}')
    rc, _out, err = _run("proxy", "--config", str(cf))
    _assert_one_line(rc, err, "proxy", f"--config {cf} key 'port'", "integer")


def test_wildcard_bind_is_announced_as_such():
    from proxy.banner import announce

    assert announce("http://127.0.0.1:8000", "0.0.0.0") == \
        "kvroute proxy listening on http://127.0.0.1:8000 (bound to 0.0.0.0: every interface)"
    assert announce("http://127.0.0.1:8000", "127.0.0.1") == "kvroute proxy listening on http://127.0.0.1:8000"


# A trace file's mistakes: which line, what was expected (issue #25); each a file of its own.
TRACE_MISTAKES = [
    ("", ["--trace-path", "no trace lines", "expected one"]),
    ("\n\n", ["--trace-path", "no trace lines"]),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{nope\n',
     ["--trace-path", ":2: not JSON", "expected a JSON object", "hash_ids"]),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2}\n', ["--trace-path", ":1: no hash_ids"]),
    ('{"timestamp": 0, "input_length": "ten", "output_length": 2, "hash_ids": [1]}\n',
     ["--trace-path", ":1: input_length 'ten' is not an integer >= 1"]),
    ('[1, 2]\n', ["--trace-path", ":1: a list, not an object"]),
    ('{"timestamp": -5, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n',
     ["--trace-path", ":1: timestamp -5 is not a number >= 0"]),
]


@pytest.mark.parametrize("text,expected", TRACE_MISTAKES, ids=[f"trace{i}" for i in range(len(TRACE_MISTAKES))])
def test_a_bad_trace_file_is_one_line_naming_the_line(tmp_path, text, expected):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    rc, _out, err = _run("loadgen", "run", "--workload", "trace", "--trace-path", str(path))
    _assert_one_line(rc, err, "loadgen", str(path), *expected)


def test_trace_offset_past_the_end_and_trace_flags_without_the_trace_workload(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n' * 3)
    rc, _out, err = _run("loadgen", "run", "--workload", "trace", "--trace-path", str(path), "--trace-offset", "3")
    _assert_one_line(rc, err, "loadgen", "--trace-offset", "3 is past the last line", "(3 records)")
    rc, _out, err = _run("loadgen", "run", "--workload", "rag", "--trace-path", str(path))
    _assert_one_line(rc, err, "loadgen", "--trace-path", "is for --workload trace", "'rag'")
    rc, _out, err = _run("loadgen", "compare", "--trace-speedup", "2")
    _assert_one_line(rc, err, "loadgen", "--trace-speedup", "is for --workload trace")


@pytest.mark.parametrize("rates,expected", [("4,fast", "expected comma-separated numbers"), ("0,4", "positive")])
def test_sweep_rates_that_are_not_positive_numbers(rates, expected):
    rc, _out, err = _run("loadgen", "sweep", "--rates", rates)
    _assert_one_line(rc, err, "loadgen", "--rates", expected)
