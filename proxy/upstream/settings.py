"""What the forwarder and the backend monitor need to know, carved out of `ProxyConfig` (which
builds them once: `config.forwarding()`, `config.monitoring()`). Plain values, no imports, so the
config can build them without loading the HTTP client."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardSettings:
    """Attempts, their timeouts and backoff, and the access log (see `ProxyConfig`'s flags)."""

    first_byte_timeout: float = 300.0
    retries: int = 1
    retry_backoff: float = 0.05
    retry_backoff_max: float = 2.0
    access_log: bool = False


@dataclass(frozen=True)
class MonitorSettings:
    """How often backends are checked and scraped, and when one counts as down."""

    health_interval: float = 2.0
    metrics_interval: float = 1.0
    unhealthy_after: int = 2
