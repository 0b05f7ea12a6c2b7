"""KV-cache-aware OpenAI/vLLM-compatible reverse proxy.

config (ProxyConfig: flags = env = file) -> front (HTTP/1.1 front door for the OpenAI POST routes;
hands other connections to the aiohttp app wired in app, which also holds start_proxy) ->
edge.handlers (ProxyHandlers.serve) -> openai_request (parse/validate, routing key) -> router (prompt_walk: lazy tokenize_cache + kvblocks
hashes; prefix_index, policies/, backends) -> forward (failover, streaming, through a
response_sink) over upstream (keep-alive HTTP/1.1 client); health (checks, vLLM metric scrapes),
metrics (Prometheus), admin (/admin/ API), kv_events (exact index from backends' KV events), bench
(`python -m benchmarks.proxy_bench overhead|decide|soak`).
"""

# `from proxy import ProxyConfig, start_proxy`; imported on first use so `import proxy.<module>` stays light.
_EXPORTS = {"ProxyConfig": "config", "start_proxy": "app", "RunningProxy": "app"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
