"""KV-cache-aware OpenAI/vLLM-compatible reverse proxy, in wings that follow a request.

app (wiring; start_proxy, RunningProxy) over config (ProxyConfig: flags = env = file):
edge/ (front door, handlers, OpenAI parsing, admission, admin, passthrough: HTTP to clients) ->
routing/ (router, prompt_walk over tokenize_cache, policies/: the decision, no HTTP) -> index/
(prefix_index, kv_events: who holds which block) and backends/ (registry, circuit_breaker: state
the deciders read) -> upstream/ (forward, client, health, tokenizer, sink: HTTP to backends);
metrics (Prometheus). `python -m proxy` (__main__) is the launcher. Benchmarks live beside the
package (`python -m benchmarks.proxy_bench overhead|decide|edge|soak`).
"""

# `from proxy import ProxyConfig, start_proxy`; imported on first use so `import proxy.<module>` stays light.
_EXPORTS = {"ProxyConfig": "config", "start_proxy": "app", "RunningProxy": "app"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
