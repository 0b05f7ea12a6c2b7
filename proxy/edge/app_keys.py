"""Typed keys of what the proxy app stores (shared by the server and admin handlers)."""
from __future__ import annotations

from aiohttp import web

from .admission import Admission
from ..metrics import ProxyMetrics
from ..routing.router import Router

ROUTER_KEY = web.AppKey("router", Router)
METRICS_KEY = web.AppKey("metrics", ProxyMetrics)
STATE_KEY = web.AppKey("state", dict)
ADMISSION_KEY = web.AppKey("admission", Admission)
