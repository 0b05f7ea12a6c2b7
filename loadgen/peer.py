"""Running a workload through a router that is not kvroute (sglang-router, vllm-router, ...).

Such a router may not know its model's name: sglang-router answers `/v1/models` with `unknown`
when its workers have no `/server_info`, and every request for `unknown` then 404s. The model is
then asked of the backends themselves (`--backend URL`), or must be given with `--model`.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .backend_metrics import base_url

PLACEHOLDER_MODELS = ("unknown",)


class ModelUnknown(ValueError):
    """No usable model name: the target reports a placeholder and no backend named one."""


async def backend_model(urls: list[str]) -> str:
    """The first model id any of `urls` lists in its /v1/models ('' when none answers)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for u in urls:
            try:
                async with s.get(base_url(u) + "/v1/models") as r:
                    data = await r.json(content_type=None)
                ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
                ids = [i for i in ids if isinstance(i, str) and i and i not in PLACEHOLDER_MODELS]
                if ids:
                    return ids[0]
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError):
                continue
    return ""


async def resolve_model(discovered: str, backends: list[str]) -> str:
    """`discovered` (the target's first model) unless it is a placeholder; then the backends' model."""
    if discovered not in PLACEHOLDER_MODELS:
        return discovered
    model = await backend_model(backends) if backends else ""
    if model:
        return model
    raise ModelUnknown(
        f"the target's /v1/models names the model {discovered!r}, which no backend serves (sglang-router "
        "reports 'unknown' when its workers have no /server_info); pass --model NAME, or --backend URL "
        "(repeatable) so the load generator asks the backends")

