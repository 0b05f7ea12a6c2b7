"""The proxy's parts in one typed object, built once by `app.create_app` and handed to the handlers,
the admin API and the front door (instead of a dict bag and a key per part on the aiohttp app)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..config import ProxyConfig
from ..metrics import ProxyMetrics
from ..routing.router import Router
from ..upstream.client import UpstreamPool
from ..upstream.forward import Forwarder
from ..upstream.health import BackendMonitor
from ..upstream.tokenizer import BackendTokenizer
from .admission import Admission
from .body_parse import BodyParser

if TYPE_CHECKING:
    from ..replicas.sync import ReplicaSync


@dataclass(eq=False)
class ProxyContext:
    """What the app is made of. The first five exist from `create_app`; the rest need the event loop
    and are filled in by the app's startup hook (None before it and for a tokenizer not in use)."""

    config: ProxyConfig
    router: Router
    admission: Admission
    metrics: ProxyMetrics
    body_parser: BodyParser  # large bodies are parsed in a worker process (edge/body_parse.py)
    session: aiohttp.ClientSession | None = None
    pool: UpstreamPool | None = None
    monitor: BackendMonitor | None = None
    forwarder: Forwarder | None = None
    backend_tokenizer: BackendTokenizer | None = None  # only with --tokenizer backend
    replicas: ReplicaSync | None = None  # only with --replica-bind / --peer / --workers


# The one key the aiohttp app holds it under (its middleware and aiohttp-served routes read it there).
CONTEXT_KEY = web.AppKey("kvroute", ProxyContext)
