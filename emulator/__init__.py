"""Emulated vLLM server: block pool, continuous-batching engine, vLLM API, metrics, KV events."""
