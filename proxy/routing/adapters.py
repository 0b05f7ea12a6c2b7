"""LoRA adapters as the backends announce them, and the block-hash keys an adapter request needs.

vLLM lists each adapter in `/v1/models` as a card with `root` = the path it was loaded from and
`parent` = its base model (a base model's card has no parent). It hashes an adapter request's blocks
with `("lora", name, path)` (`kvblocks.extra_keys`), so the proxy must know the path to predict
them: the exact index then matches adapter traffic, and the approximate index never lets base-model
blocks stand for an adapter's. Two backends serving one name from different paths hash it apart;
routing keys such a request with the path most backends use (and says so once in the log).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvblocks import LoraKey

log = logging.getLogger("kvroute.proxy")
MAX_SEEN = 4096


@dataclass(frozen=True)
class AdapterCard:
    """One adapter a backend serves: its name (the `model` requests use), path (vLLM's `root`) and base."""

    name: str
    path: str
    parent: str

    @property
    def key(self) -> LoraKey:
        return LoraKey(self.name, self.path)


def parse_model_cards(entries: Iterable[Any]) -> tuple[list[str], dict[str, AdapterCard]]:
    """A /v1/models `data` list -> (every model id, the adapters among them by name).

    An adapter is a card whose `parent` names another model and whose `root` is its path; anything
    else (a base model, an alias from --served-model-name) is served as is."""
    ids: list[str] = []
    adapters: dict[str, AdapterCard] = {}
    for m in entries:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            continue
        ids.append(m["id"])
        parent, root = m.get("parent"), m.get("root")
        if isinstance(parent, str) and parent and parent != m["id"] and isinstance(root, str) and root:
            adapters[m["id"]] = AdapterCard(m["id"], root, parent)
    return ids, adapters


class AdapterCatalog:
    """Which adapter a request's `model` names, across the backends' latest /v1/models answers."""

    def __init__(self) -> None:
        self._split_logged: set[str] = set()
        self._seen: dict[str, AdapterCard] = {}  # every adapter card ever announced (bounded), for runtime loading

    def card(self, model: str | None, backends: Iterable[Any]) -> AdapterCard | None:
        """The adapter `model` names: as a backend announces it now, else as one announced it before."""
        if model is None:
            return None
        for b in backends:
            c = b.adapters.get(model) if b.adapters else None
            if c is not None:
                if model not in self._seen and len(self._seen) >= MAX_SEEN:
                    del self._seen[next(iter(self._seen))]
                self._seen[model] = c
                return c
        return self._seen.get(model)

    def lora_key(self, model: str | None, backends: Iterable[Any]) -> LoraKey | None:
        """The adapter's hash key when `model` is an adapter some backend serves, else None (a base model)."""
        if model is None:
            return None
        paths: Counter[str] = Counter()
        for b in backends:
            card = b.adapters.get(model) if b.adapters else None
            if card is not None:
                paths[card.path] += 1
        if not paths:
            return None
        if len(paths) > 1 and model not in self._split_logged:
            self._split_logged.add(model)
            log.warning("adapter %s is loaded from different paths on different backends (%s): vLLM hashes its "
                        "blocks apart per path, so only backends with the most common path match its prefixes",
                        model, ", ".join(sorted(paths)))
        path = min(paths, key=lambda p: (-paths[p], p))
        return LoraKey(model, path)

    @staticmethod
    def base_of(model: str | None, backends: Iterable[Any]) -> str | None:
        """The base model an adapter runs on (the model itself when it is not an adapter)."""
        for b in backends:
            card = b.adapters.get(model) if b.adapters else None
            if card is not None:
                return card.parent
        return model
