"""KV-cache-aware OpenAI/vLLM-compatible reverse proxy."""
