"""Parsing a large request body away from the event loop, so no one request stalls everyone.

The proxy is one event loop: orjson takes ~0.1-0.2 s (on the 2-core dev machine) to build a 7.5 MB
list of 1.5M ids or a 200k-message chat, and holds the GIL while it does, so a thread would not
help. A body over OFFLOAD_BYTES is parsed (its bounds checked first, see `openai_request`) in a
worker process, `python -m proxy.edge.body_parse`, one per proxy, started on first use; what comes back
is small: an error, or a prompt already bounded by the context length. Bodies up to OFFLOAD_BYTES
(the common case) cost a few ms at most and are parsed in place. The worker is a plain child over
pipes (length-prefixed pickles), not multiprocessing, so it never re-imports the caller's script.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvblocks import APIError

from . import openai_request
from .openai_request import ParsedRequest

if TYPE_CHECKING:
    from ..routing.router import Router

log = logging.getLogger("kvroute.proxy")

OFFLOAD_BYTES = 64 * 1024
_LEN = struct.Struct("!Q")
_PARSERS = {"completion": openai_request.parse_completion, "chat": openai_request.parse_chat}
_NAMES = {fn: name for name, fn in _PARSERS.items()}


class BodyParser:
    """One worker process and the requests queued for it (one at a time, in order)."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None

    async def parse(self, parse: Callable[..., ParsedRequest], raw: bytes, router: Router) -> ParsedRequest:
        """`parse(raw, router.max_model_len)`, off the loop when `raw` is large (the worker gets each known
        model's limit, and the configured default for any other name, as `Router.max_model_len` gives)."""
        limit_for = router.max_model_len
        name = _NAMES.get(parse)
        if len(raw) <= OFFLOAD_BYTES or name is None:
            return parse(raw, limit_for)
        models = {m for b in router.registry for m in (b.models or ())}
        limits = {m: limit_for(m) for m in (None, *models)}
        head = pickle.dumps((name, limits, router.settings.max_model_len))
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                out = await self._call(head, raw)
            except (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError):
                log.warning("the body-parsing worker process failed; restarting it")
                await self.close()
                return parse(raw, limit_for)
        if isinstance(out, tuple):
            _, status, message, param, type_ = out
            raise APIError(status, message, param, type_)
        return out

    async def _call(self, head: bytes, raw: bytes):
        proc = self._proc
        if proc is None or proc.returncode is not None:
            pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
            proc = self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.edge.body_parse", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, limit=1 << 20)
        try:
            proc.stdin.write(_LEN.pack(len(head)) + head + _LEN.pack(len(raw)))
            proc.stdin.write(raw)
            await proc.stdin.drain()
            size = _LEN.unpack(await proc.stdout.readexactly(_LEN.size))[0]
            return pickle.loads(await proc.stdout.readexactly(size))
        except asyncio.CancelledError:  # the client left mid-call: the pipe's framing is lost with it
            await self.close()
            raise

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await proc.wait()


def _serve_pipe() -> None:
    """The worker: read (parser, limits, default) and a body, write back the parse or the error as values."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def read(n: int) -> bytes:
        data = inp.read(n)
        if len(data) < n:
            raise SystemExit(0)
        return data

    while True:
        name, limits, default = pickle.loads(read(_LEN.unpack(read(_LEN.size))[0]))
        raw = read(_LEN.unpack(read(_LEN.size))[0])
        try:
            result = _PARSERS[name](raw, lambda model: limits.get(model, default))
        except APIError as e:  # APIError does not pickle: send its values
            result = ("error", e.status, e.message, e.param, e.type)
        del raw
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_LEN.pack(len(data)) + data)
        out.flush()


if __name__ == "__main__":
    _serve_pipe()
