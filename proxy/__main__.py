"""`python -m proxy`: serve the proxy (with embedded emulators when no backend is given)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence

from .config import ProxyConfig
from .server import start_proxy


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": record.created, "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()})


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


async def serve(config: ProxyConfig) -> None:
    proxy = await start_proxy(config)
    # Startup objects (tokenizer vocab, app) never die: keep them out of the cyclic GC's scans, and
    # let the request path (short-lived lists of ids and hashes) allocate more between collections.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    router = proxy.router
    print(f"kvroute proxy listening on {proxy.url} (strategy {router.strategy})", flush=True)
    for b in router.registry:
        kind = "embedded emulator" if proxy.emulators else "backend"
        print(f"  routing to {kind} {b.url}", flush=True)
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
    setup_logging(config.log_format, config.log_level)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
