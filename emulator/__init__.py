"""Emulated vLLM server: block pool, continuous-batching engine, vLLM API, metrics, KV events."""

# `from emulator import EmulatorConfig, start_emulator` (what docs/emulator.md shows); imported on first use so
# `import emulator.<module>` stays light.
_EXPORTS = {"EmulatorConfig": "config", "start_emulator": "server", "start_emulators": "server",
            "RunningEmulator": "server"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
