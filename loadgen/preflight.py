"""Checks before a run sends anything: is the target a live OpenAI API, does it serve the model, and do
the backends' clocks run at the time scale the load generator assumes?

Each failed check is a UsageError naming the flag to fix (`--target`, `--model`, `--time-scale`), so a
mistyped URL is one clear line at start-up instead of a run of identical per-request errors.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from kvblocks.cli import UsageError

from .backend_metrics import base_url
from .peer import resolve_model

PREFLIGHT_TIMEOUT_S = 10.0
# Emulated figures are wall time / time scale: a mismatch beyond this relative amount skews every latency.
TIME_SCALE_TOLERANCE = 1e-6


@dataclass
class Preflight:
    """What the checks learnt: the model to ask for and the backends' time scales (emulators only)."""

    model: str
    models: list[str]
    time_scales: dict[str, float]


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url) as r:
        try:
            body = await r.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            body = None
        return r.status, body


async def check_target(target: str, model: str = "", api_key: str = "") -> tuple[str, list[str]]:
    """The model to use and every model `target` (an OpenAI base URL, …/v1) serves; UsageError otherwise."""
    url = target.rstrip("/") + "/models"
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=_headers(api_key)) as s:
        try:
            status, body = await _get_json(s, url)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else (str(e) or type(e).__name__)
            raise UsageError("--target", f"{target}: cannot reach GET {url} ({reason}); is the proxy running?") from None
        if status == 404 and not target.rstrip("/").endswith("/v1"):
            hint = target.rstrip("/") + "/v1"
            try:
                ok, _ = await _get_json(s, hint + "/models")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                ok = 0
            if ok == 200:
                raise UsageError("--target", f"{target}: GET {url} is 404; the OpenAI base URL ends in /v1: use {hint}")
        if status in (401, 403):
            raise UsageError("--api-key", f"{target} refused the key (GET {url} -> HTTP {status})")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise UsageError("--target", f"{target}: GET {url} -> HTTP {status}, not an OpenAI model list")
    models = [str(m.get("id")) for m in body["data"] if isinstance(m, dict) and m.get("id")]
    if model:
        if model not in models:
            raise UsageError("--model", f"{model!r} is not served by {target} (it serves: {', '.join(models) or 'nothing'})")
        return model, models
    if not models:
        raise UsageError("--target", f"{target} serves no model (GET {url} lists none; are its backends healthy?)")
    return models[0], models


async def backend_time_scales(backends: list[str]) -> dict[str, float]:
    """Each emulated backend's time scale from its /version (real vLLM does not say: left out)."""
    out: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=PREFLIGHT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for b in backends:
            try:
                status, body = await _get_json(s, base_url(b) + "/version")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                continue
            emu = body.get("kvroute_emulator") if status == 200 and isinstance(body, dict) else None
            if isinstance(emu, dict) and isinstance(emu.get("time_scale"), (int, float)):
                out[b] = float(emu["time_scale"])
    return out


def check_time_scale(time_scale: float, scales: dict[str, float]) -> None:
    """UsageError when the backends run at another time scale than `--time-scale` says (figures would be off)."""
    wrong = {b: s for b, s in scales.items() if abs(s - time_scale) > TIME_SCALE_TOLERANCE * max(s, time_scale)}
    if wrong:
        b, s = next(iter(wrong.items()))
        raise UsageError("--time-scale", f"is {time_scale:g} but the emulator at {b} runs at time scale {s:g} "
                         f"({len(wrong)} of {len(scales)} backends differ); pass --time-scale {s:g}")


async def preflight(target: str, model: str, api_key: str, time_scale: float, backends: list[str]) -> Preflight:
    """`model` if given (checked against the target's list), else the target's first model; a router
    that lists a placeholder (`unknown`: sglang-router) gets the backends' model instead."""
    given = model
    model, models = await check_target(target, model, api_key)
    if not given:
        model = await resolve_model(model, backends)
    scales = await backend_time_scales(backends)
    check_time_scale(time_scale, scales)
    return Preflight(model, models, scales)
