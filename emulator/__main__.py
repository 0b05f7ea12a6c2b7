"""`python -m emulator`: run 1..N emulated vLLM servers until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import sys

import errno

from kvblocks.cli import UsageError, check_listen, exit_on_usage_error
from kvblocks.logs import configure_logging, get_logger

from .config import EmulatorConfig

CRASH_EXIT_CODE = 70


def _exit_process() -> None:
    """--fault-crash-after in a process of its own: die at once, like a killed server (no cleanup)."""
    os._exit(CRASH_EXIT_CODE)


async def serve(config: EmulatorConfig) -> None:
    from .server import STATE, start_emulators  # after the flags are checked

    if config.port:
        check_listen(config.host, [config.port + i for i in range(config.replicas)])

    log = get_logger("emulator")
    emulators = await start_emulators(config)
    for em in emulators:
        em.app[STATE].faults.crash = _exit_process
        # The first line per replica is machine-readable so scripts (and tests) can find the port.
        print(f"EMULATOR_URL {em.url}", flush=True)
        pool = em.engine.block_pool
        log.info(
            "emulator listening",
            url=em.url,
            model=config.model,
            engine=config.engine,
            profile=config.profile,
            time_scale=config.time_scale,
            num_gpu_blocks=pool.num_gpu_blocks,
            capacity_tokens=pool.num_usable_blocks * pool.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.resolved_max_num_batched_tokens,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down", replicas=len(emulators))
        await asyncio.gather(*(em.stop() for em in emulators))


def main(argv: list[str] | None = None) -> int:
    config = EmulatorConfig.from_cli(argv)
    configure_logging(config.log_format)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with exit_on_usage_error("python -m emulator"):
        try:
            runner(serve(config))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError("--port", f"{config.host}:{config.port} (or a replica's port after it) is already "
                                 "in use; try --port 0") from None
            raise UsageError("--host/--port", f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
