"""The one monotonic clock the emulator's engine and the proxy's routing read.

It is `time.monotonic` unless a simulation installs its event loop's virtual time (`loadgen
simulate`): then the same engine, router and policy code runs on emulated seconds that cost no
wall time. A swap, not a second code path: every reader calls `monotonic()` either way.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_source: Callable[[], float] = time.monotonic


def monotonic() -> float:
    """Seconds on the current clock (wall-clock monotonic time unless `installed` swapped it)."""
    return _source()


@contextmanager
def installed(source: Callable[[], float]) -> Iterator[None]:
    """Read `source` instead of the wall clock inside the block (one simulation at a time)."""
    global _source
    if _source is not time.monotonic:
        raise RuntimeError("another clock is already installed (simulations do not nest)")
    _source = source
    try:
        yield
    finally:
        _source = time.monotonic
