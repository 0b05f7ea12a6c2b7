"""LoRA adapters on one emulated server, as vLLM serves them (`--enable-lora --lora-modules name=path`).

An adapter is a name requests put in `model`, the path it was loaded from and an id (vLLM's
lora_int_id, counted from 1 in load order). Its blocks hash with `("lora", name, path)` on every
block (`kvblocks.extra_keys`), /v1/models lists it with `root` = path and `parent` = the base model,
and at most `max_loras` distinct adapters run in one step: a waiting request whose adapter would be
one too many waits, the others go ahead (vLLM's scheduler). Bringing an adapter into a slot it was
not in costs `lora_load_s` emulated seconds on that step (the swap a real GPU pays).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvblocks import APIError, LoraKey


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    id: int

    @property
    def key(self) -> LoraKey:
        return LoraKey(self.name, self.path)


def parse_lora_module(spec: str) -> tuple[str, str]:
    """`name=path` (vLLM's --lora-modules short form) -> (name, path); a ValueError names the flag."""
    name, sep, path = spec.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"lora_modules entry {spec!r} must be NAME=PATH")
    return name, path


class LoraRegistry:
    """The adapters one server serves; shared by its request parser, engine, metrics and API."""

    def __init__(self, base_model: str, modules: list[str], max_loras: int = 1) -> None:
        self.base_model = base_model
        self.max_loras = max_loras
        self.adapters: dict[str, Adapter] = {}
        self._next_id = 1
        for spec in modules:
            name, path = parse_lora_module(spec)
            self.load(name, path)

    @property
    def enabled(self) -> bool:
        return bool(self.adapters) or self._next_id > 1

    def get(self, name: str | None) -> Adapter | None:
        return self.adapters.get(name) if name is not None else None

    def load(self, name: str, path: str, in_place: bool = False) -> Adapter:
        """Add an adapter (vLLM's /v1/load_lora_adapter); 400 when the name is taken or is the base model's."""
        if not name or not path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", type="InvalidUserInput")
        if name == self.base_model:
            raise APIError(400, f"The lora adapter '{name}' conflicts with a served base model.", type="InvalidUserInput")
        old = self.adapters.get(name)
        if old is not None and not in_place:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                           "in place, set 'load_inplace' to True.", type="InvalidUserInput")
        if old is None:
            a = Adapter(name, path, self._next_id)
            self._next_id += 1
        else:
            a = Adapter(name, path, old.id)
        self.adapters[name] = a
        return a

    def unload(self, name: str) -> None:
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", type="InvalidUserInput")
        if self.adapters.pop(name, None) is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", type="NotFoundError")

    def cards(self) -> list[tuple[str, str]]:
        """(name, path) of every adapter, in load order (as /v1/models lists them)."""
        return [(a.name, a.path) for a in self.adapters.values()]
