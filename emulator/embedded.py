"""Emulators started in-process beside a proxy (`python -m proxy` with no backend, the load generator).

Takes plain values, not the proxy's config: the emulator knows nothing of the proxy, and the proxy
nothing of the emulator; the launcher that wants both composes them (as SGLang's `launch_server`
starts the workers, then the router over their URLs).
"""
from __future__ import annotations

from .config import EmulatorConfig
from .server import RunningEmulator, start_emulators


async def start(
    n: int, *, host: str, profile: str, time_scale: float, block_size: int, hash_algo: str, model: str | None = None,
) -> list[RunningEmulator]:
    """`n` emulators on the current loop (OS-assigned ports on `host`), request logs off; `model` None = the default."""
    kwargs: dict = dict(
        host=host,
        port=0,
        profile=profile,
        time_scale=time_scale,
        block_size=block_size,
        prefix_caching_hash_algo=hash_algo,
        log_requests=False,
    )
    if model:
        kwargs["model"] = model
    return list(await start_emulators(EmulatorConfig(**kwargs), n))
