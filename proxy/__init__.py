"""KV-cache-aware OpenAI/vLLM-compatible reverse proxy.

config (ProxyConfig: flags = env = file) -> server (aiohttp app, start_proxy) -> openai_request
(parse/validate, routing key) -> router (tokenize_cache + kvblocks hashes, prefix_index, policies/,
backends) -> forward (failover, streaming) over upstream (keep-alive HTTP/1.1 client); health
(checks, vLLM metric scrapes), metrics (Prometheus), admin (/admin/ API), kv_events (exact index
from backends' KV events), bench (`python -m proxy.bench overhead|decide`).
"""
