"""An asyncio event loop on virtual time: idle waits cost nothing, so emulated hours run in minutes.

`loop.time()` is a number the loop advances itself: when no callback is ready, the selector's
`select(timeout)` (asyncio's "sleep until the next timer") moves time forward by `timeout` and
returns at once, instead of blocking. Every `asyncio.sleep`, `call_later` and `wait_for` then fires
at its exact virtual moment, in the order the real loop would fire them, and the code that runs on
it (the emulator's engine, the proxy's router) is the code a wall-clock run executes.

Why not a library: `looptime` (pytest plugin) and `aiotools.VirtualClock` patch a loop's `time` and
`select` the same way, for tests; simpy and salabim run generator processes of their own, which would
have meant rewriting the async engine as a second, simulation-only model. This is the whole trick,
and it refuses real I/O (no sockets can be waited on), so a simulation cannot block on the network.
"""
from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any


class SimulationStalled(RuntimeError):
    """Nothing is ready and no timer is set, yet the main task has not finished: it waits forever."""


class _VirtualSelector(selectors.BaseSelector):
    """Accepts the loop's own self-pipe registration, never reports I/O, and advances time on select."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list:
        if timeout is None:
            raise SimulationStalled("the simulation waits on something no timer or callback will ever deliver")
        if timeout > 0:
            self._loop._now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`asyncio.SelectorEventLoop` whose `time()` is virtual, starting at `start`."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._now
