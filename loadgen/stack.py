"""The system under test when none is given: a proxy with embedded emulators, started in-process."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .backend_metrics import base_url


@dataclass
class Stack:
    """Where to send requests, and how to describe it in a report."""

    target: str
    description: str


@asynccontextmanager
async def managed_proxy(target: str | None, time_scale: float, backends: int = 4) -> AsyncIterator[Stack]:
    """Yield `target` as is, or start a proxy (port 0) whose `backends` emulators run `time_scale` times faster."""
    if target:
        yield Stack(target, f"{target} (running proxy)")
        return
    from proxy.config import ProxyConfig
    from proxy.server import start_proxy

    running = await start_proxy(ProxyConfig(host="127.0.0.1", port=0, time_scale=time_scale,
                                            embedded_backends=backends))
    try:
        url = base_url(running.url) + "/v1"
        yield Stack(url, f"proxy started by the load generator at {url} with {backends} embedded emulators "
                         f"(time scale {time_scale:g})")
    finally:
        await running.stop()
