"""`python -m proxy`: serve the proxy (with embedded emulators when no backend is given).

The launcher composes the two apps: with no backend it starts `config.emulators` emulators
(`emulator.embedded`) on the same loop and serves the proxy over their URLs. It is the only proxy
module that names the emulator, and only on that path: the proxy itself runs without it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvblocks.cli import UsageError, check_listen, exit_on_usage_error
from kvblocks.logs import configure_logging, get_logger

from .banner import announce, how_to_use
from .config import ProxyConfig

if TYPE_CHECKING:
    from .app import RunningProxy

PROG = "python -m proxy"


def bind_error(config: ProxyConfig, e: OSError) -> UsageError:
    """A listening socket that cannot be had is the user's to fix: name the flag."""
    if e.errno == errno.EADDRINUSE:
        return UsageError("--port", f"{config.host}:{config.port} is already in use (another proxy? try --port 0)")
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
        return UsageError("--host", f"cannot bind {config.host!r}: {e.strerror or e}")
    if e.errno == errno.EACCES:
        return UsageError("--port", f"{config.port}: permission denied (ports below 1024 need privileges)")
    return UsageError("--host/--port", f"cannot listen on {config.host}:{config.port}: {e.strerror or e}")


def _loopback_for(host: str) -> str:
    """Where embedded emulators listen: the proxy's host, or loopback when the proxy binds every interface."""
    return host if host not in ("0.0.0.0", "::") else "127.0.0.1"


async def embedded_emulators(config: ProxyConfig) -> list:
    """`config.emulators` emulators on this loop, shaped by the proxy's flags (profile, time scale, hashing)."""
    from emulator import embedded

    return await embedded.start(
        config.emulators, host=_loopback_for(config.host), profile=config.profile, time_scale=config.time_scale,
        block_size=config.block_size, hash_algo=config.hash_algo, model=config.emulator_model,
    )


async def launch(config: ProxyConfig) -> RunningProxy:
    """`start_proxy(config)`; with no backend configured, first `config.emulators` embedded emulators on this
    loop, which the proxy then routes to and stops (after itself) in `stop()`."""
    from .app import start_proxy  # after the flags are checked: a mistake is reported without loading the server

    if config.all_backends():
        return await start_proxy(config)
    emulators = await embedded_emulators(config)
    try:
        proxy = await start_proxy(dataclasses.replace(config, backends=[e.url for e in emulators], backends_file=None))
    except BaseException:
        for e in emulators:
            await e.stop()
        raise
    proxy.emulators = list(emulators)
    return proxy


async def serve(config: ProxyConfig) -> None:
    if config.port:
        check_listen(config.host, [config.port])

    try:
        proxy = await launch(config)
    except OSError as e:
        raise bind_error(config, e) from None
    # Startup objects (tokenizer vocab, app) never die: keep them out of the cyclic GC's scans, and
    # let the request path (short-lived lists of ids and hashes) allocate more between collections.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    router = proxy.router
    print(f"{announce(proxy.url, config.host)} (strategy {router.strategy})", flush=True)
    print(how_to_use(proxy.url, config.access_log), flush=True)
    get_logger("proxy").info("routing", backends=[b.url for b in router.registry],
                             embedded_emulators=bool(proxy.emulators), strategy=router.strategy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: Sequence[str] | None = None) -> None:
    config = ProxyConfig.from_cli(argv)
    configure_logging(config.log_format, config.log_level)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with exit_on_usage_error(PROG):
        if config.worker_count() > 1:
            from .replicas.workers import supervise

            sys.exit(asyncio.run(supervise(config, list(sys.argv[1:] if argv is None else argv), embedded_emulators)))
        if uvloop is not None:
            uvloop.run(serve(config))
        else:
            asyncio.run(serve(config))


if __name__ == "__main__":
    main()
