"""`python -m proxy --workers N`: N proxy processes on one port, each a replica of the others.

Python serves one core per process, so more cores mean more processes. The kernel spreads
connections over the N listening sockets (SO_REUSEPORT); the workers share what they route over
ipc:// (`sync.py`), so they hold one index and one in-flight picture; `/metrics` on any worker
sums the workers' counters (`aggregate.py`); admin changes made on one reach all.

This parent process only supervises: it reserves the port (a bound, non-listening SO_REUSEPORT
socket, so `--port 0` gets one port for all), hosts the embedded emulators when no backend is
given (one set, not one per worker), starts the workers with `--workers 1 --reuse-port
--replica-bind ipc://DIR/wK --peer ipc://DIR/wJ...`, prints the start-up line once all are
listening, forwards SIGTERM/SIGINT to them, and exits when they have. A worker that dies is not
restarted: the parent stops the others and exits non-zero, so a supervisor (systemd, Kubernetes)
restarts the whole proxy - a half-sized proxy serving on would hide the failure.

Each worker still runs its own backend health checks, /metrics scrapes and KV-event
subscriptions: they cost one HTTP GET per interval per backend per worker, and a vLLM PUB socket
fans out to any number of subscribers; sharing them would make a worker's view of the backends
depend on another worker staying alive.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence

from kvblocks.cli import UsageError, check_listen
from kvblocks.logs import get_logger

from ..banner import announce, how_to_use
from ..config import ProxyConfig

READY = "kvroute proxy listening on "
USAGE_PREFIX = b"  OpenAI base URL"  # the second start-up line (banner.how_to_use)
START_TIMEOUT_S = 120.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: holds the port, resolves 0, and the workers can join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host or "0.0.0.0", port))
    return s


def worker_argv(argv: Sequence[str], port: int, index: int, n: int, ipc_dir: str, backends: Sequence[str]) -> list[str]:
    """The user's flags plus what makes worker `index` one of `n` replicas on `port` (later flags win)."""
    out = [sys.executable, "-m", "proxy", *argv, "--workers", "1", "--port", str(port), "--reuse-port",
           "--replica-bind", f"ipc://{ipc_dir}/w{index}"]
    for j in range(n):
        if j != index:
            out += ["--peer", f"ipc://{ipc_dir}/w{j}"]
    for url in backends:
        out += ["--backend", url]
    return out


async def supervise(config: ProxyConfig, argv: Sequence[str],
                    start_emulators: Callable[[ProxyConfig], Awaitable[list]] | None = None) -> int:
    """Run `config.worker_count()` workers until a signal (exit 0) or a worker's death (exit 1); with no
    backend, `start_emulators` (the launcher's) starts the embedded emulators they share."""
    n = config.worker_count()
    if config.peers or config.replica_bind:
        raise UsageError("--workers", "cannot be combined with --peer/--replica-bind yet: run one worker per "
                                      "replica across hosts (a pod), or several workers on one host")
    log = get_logger("proxy.workers")
    if config.port:
        check_listen(config.host, [config.port])
    try:
        reserved = reserve_port(config.host, config.port)
    except OSError as e:
        raise UsageError("--port", f"cannot reserve {config.host}:{config.port}: {e.strerror or e}") from None
    port = reserved.getsockname()[1]
    emulators: list = []
    backends: list[str] = []
    if not config.all_backends():
        if start_emulators is None:
            raise UsageError("--backend", "--workers needs backends (or a launcher that starts emulators)")
        emulators = await start_emulators(config)
        backends = [e.url for e in emulators]
    ipc_dir = tempfile.mkdtemp(prefix="kvroute-workers-")
    procs: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        for i in range(n):
            procs.append(await asyncio.create_subprocess_exec(
                *worker_argv(argv, port, i, n, ipc_dir, backends), stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        url = None
        for p in procs:
            line = await _ready_line(p)
            if line is None:
                raise UsageError("--workers", f"a worker exited before listening (exit {p.returncode}); see its log above")
            url = url or line[len(READY):].split()[0]
        print(f"{announce(url, config.host)} (strategy {config.strategy}, {n} workers)", flush=True)
        print(how_to_use(url, config.access_log), flush=True)
        log.info("workers", n=n, pids=[p.pid for p in procs], port=port, backends=backends or config.all_backends())
        forwards = [loop.create_task(_forward(p)) for p in procs]
        waits = [loop.create_task(p.wait()) for p in procs]
        stopper = loop.create_task(stop.wait())
        done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            dead = next(p for p, w in zip(procs, waits) if w in done)
            log.error("worker died; stopping the others", pid=dead.pid, returncode=dead.returncode)
            code = 1
        stopper.cancel()
        for f in forwards:
            f.cancel()
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), config.shutdown_grace + 10)
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for e in emulators:
            await e.stop()
        reserved.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return code


async def _ready_line(p: asyncio.subprocess.Process) -> str | None:
    """The worker's start-up line (its stdout until it), or None if it exited first."""
    assert p.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                raw = await p.stdout.readline()
                if not raw:
                    return None
                line = raw.decode(errors="replace").strip()
                if line.startswith(READY):
                    return line
                print(line, flush=True)
    except TimeoutError:
        return None


async def _forward(p: asyncio.subprocess.Process) -> None:
    """A worker's later stdout, passed through (its logs go to the shared stderr directly); its own
    how-to-use line is the parent's to print, once."""
    assert p.stdout is not None
    while raw := await p.stdout.readline():
        if raw.startswith(USAGE_PREFIX):
            continue
        sys.stdout.write(raw.decode(errors="replace"))
        sys.stdout.flush()
