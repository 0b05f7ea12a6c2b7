"""Loading a LoRA adapter into a backend at run time (vLLM's POST /v1/load_lora_adapter).

Used only with `--lora-runtime-load`: routing may then pick a backend of the adapter's base model
that has not loaded it (kv_aware charges the load, more when the backend has no free adapter slot).
vLLM accepts the call only when started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; a backend that
refuses is marked (`Backend.runtime_lora = False`) and never offered such a request again. Concurrent
requests for one (backend, adapter) share one load; every load is bounded by a timeout.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from ..backends.registry import Backend
from ..routing.adapters import AdapterCard

log = logging.getLogger("kvroute.proxy")
LOAD_TIMEOUT_S = 60.0
MAX_ANSWER_BYTES = 65536  # vLLM answers a line of text or a small JSON error


class RuntimeLoraLoader:
    def __init__(self, session: aiohttp.ClientSession, timeout: float = LOAD_TIMEOUT_S) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._loading: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self.loads = 0

    async def ensure(self, b: Backend, card: AdapterCard) -> bool:
        """Whether `b` serves `card` now (loading it if needed)."""
        if card.name in b.adapters:
            return True
        key = (b.url, card.name)
        fut = self._loading.get(key)
        if fut is None:
            fut = self._loading[key] = asyncio.get_running_loop().create_future()
            try:
                fut.set_result(await self._load(b, card))
            except BaseException as e:  # cancelled or a bug: the waiters learn it failed, the next try reloads
                fut.set_result(False)
                if not isinstance(e, Exception):
                    raise
                log.exception("loading adapter %s on %s failed", card.name, b.url)
            finally:
                self._loading.pop(key, None)
        return await asyncio.shield(fut)

    async def _load(self, b: Backend, card: AdapterCard) -> bool:
        body = {"lora_name": card.name, "lora_path": card.path}
        try:
            async with self.session.post(b.url + "/v1/load_lora_adapter", json=body, timeout=self.timeout,
                                         headers=b.auth_headers, allow_redirects=False) as r:
                text = (await r.content.read(MAX_ANSWER_BYTES)).decode("utf-8", "replace")  # bounded
                ok = r.status == 200 or (r.status == 400 and "already been loaded" in text)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.warning("backend %s: loading adapter %s failed: %s", b.url, card.name, e)
            return False
        if not ok:
            if b.runtime_lora is not False:
                log.warning("backend %s refused to load adapter %s at run time (HTTP %d): no runtime loading there "
                            "(vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)", b.url, card.name, r.status)
            b.runtime_lora = False
            return False
        b.runtime_lora = True
        self.loads += 1
        b.adapters = {**b.adapters, card.name: card}
        if b.models is not None and card.name not in b.models:
            b.models = [*b.models, card.name]
        log.info("backend %s: loaded adapter %s from %s at run time", b.url, card.name, card.path)
        return True
