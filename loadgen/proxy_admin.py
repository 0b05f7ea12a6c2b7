"""The proxy's admin API as the load generator uses it: strategy get/set, reset, backend list."""
from __future__ import annotations

from typing import Any

import aiohttp

from .backend_metrics import base_url


class AdminError(RuntimeError):
    """The proxy refused or failed an admin call."""


class ProxyAdmin:
    """Admin calls against the proxy whose OpenAI base URL is `target` (…/v1)."""

    def __init__(self, target: str, admin_key: str = "") -> None:
        self.root = base_url(target)
        self.headers = {}
        if admin_key:
            self.headers = {"Authorization": f"Bearer {admin_key}", "x-admin-key": admin_key}

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        async with aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.request(method, self.root + path, json=json) as r:
                body = await r.json(content_type=None) if r.content_length != 0 else None
                if r.status >= 400:
                    raise AdminError(f"{method} {path} -> HTTP {r.status}: {body}")
                return body

    async def strategy(self) -> str:
        body = await self._call("GET", "/admin/strategy")
        return body["strategy"]

    async def strategy_and_available(self) -> tuple[str, list[str]]:
        """The current strategy and every name the proxy accepts ([] when it does not say)."""
        body = await self._call("GET", "/admin/strategy")
        available = body.get("available") if isinstance(body, dict) else None
        return body["strategy"], [str(x) for x in available] if isinstance(available, list) else []

    async def set_strategy(self, name: str) -> None:
        await self._call("PUT", "/admin/strategy", {"strategy": name})
        current = await self.strategy()
        if current != name:
            raise AdminError(f"strategy is {current!r} after setting {name!r}")

    async def reset(self) -> None:
        """Clear the proxy's index and every backend's prefix cache; fail if any backend did not reset."""
        body = await self._call("POST", "/admin/reset")
        if isinstance(body, dict) and body.get("ok") is False:
            raise AdminError(f"reset failed on some backend: {body.get('backends')}")

    async def backends(self) -> list[str]:
        """URLs of the proxy's backends."""
        body = await self._call("GET", "/admin/backends")
        items = body.get("backends", body) if isinstance(body, dict) else body
        return [b["url"] if isinstance(b, dict) else str(b) for b in items]
