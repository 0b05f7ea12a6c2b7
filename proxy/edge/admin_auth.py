"""Who may call the admin API: the rule, in one place.

The admin API adds and removes backends (where user prompts go), switches the strategy and resets
every cache, so it is never open to the network by default:
- with an admin key (`--admin-key`, `--admin-key-file`, `KVROUTE_ADMIN_KEY`): `Authorization:
  Bearer <key>` is required, compared in constant time;
- without one, bound to loopback only (the default 127.0.0.1): open, to local users only (a
  warning at start-up says so);
- without one, bound to anything else (0.0.0.0, a LAN address; the Docker image): refused to
  everyone, 403 naming the flags that open it.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Mapping

from kvblocks import APIError
from kvblocks.http_errors import bearer_token

log = logging.getLogger("kvroute.proxy")

KEYED, LOCAL_OPEN, DISABLED = "key", "loopback-open", "disabled"


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches loopback only ("localhost" counts; a wildcard or a name does not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class AdminGate:
    """Checks one admin call's headers; `mode` says which of the three rules above applies."""

    def __init__(self, key: str | None, host: str) -> None:
        self._key = key.encode() if key else None
        self.host = host
        self.mode = KEYED if key else LOCAL_OPEN if is_loopback(host) else DISABLED

    def warn_at_start(self) -> None:
        if self.mode == LOCAL_OPEN:
            log.warning("the admin API (/admin/) has no key: it is open to every local user of this machine "
                        "(set --admin-key-file or KVROUTE_ADMIN_KEY to require one)")
        elif self.mode == DISABLED:
            log.warning("the admin API (/admin/) is disabled: bound to %s without an admin key "
                        "(set --admin-key-file or KVROUTE_ADMIN_KEY to enable it)", self.host)

    def check(self, headers: Mapping[str, str]) -> None:
        if self.mode == LOCAL_OPEN:
            return
        if self.mode == DISABLED:
            raise APIError(403, f"the admin API is disabled: the proxy listens on {self.host} without an admin key "
                                "(start it with --admin-key-file, --admin-key or KVROUTE_ADMIN_KEY)",
                           type="PermissionDeniedError")
        token = bearer_token(headers).encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, self._key):
            raise APIError(401, "admin key required (Authorization: Bearer ...)", type="AuthenticationError")
