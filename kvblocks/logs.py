"""One logging stack for proxy, emulator and load generator: structlog over stdlib logging.

Loggers are named `kvroute.<package>[.<part>]`. structlog loggers and plain `logging` loggers (ours,
aiohttp's, asyncio's) end in the same handler and renderer, so a process prints one format:
console lines for a terminal or one JSON object per line for containers.
"""
from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson
import structlog

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def get_logger(name: str) -> Any:
    """A structlog logger named `kvroute.<name>` (name without the prefix, e.g. `proxy.access`)."""
    return structlog.get_logger(name if name.startswith("kvroute") else f"kvroute.{name}")


def _json(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(fmt: str = "console", level: str | int = "info", stream: IO[str] | None = None) -> None:
    """Process-wide: called by the `python -m` entry points, not by library users or tests."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    stream = sys.stderr if stream is None else stream
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer(serializer=_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), structlog.stdlib.PositionalArgumentsFormatter()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if fmt == "json" else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    # aiohttp's own access log would be a second format; the proxy writes its own (--access-log).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _identity(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict
