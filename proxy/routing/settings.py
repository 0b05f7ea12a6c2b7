"""What routing needs to know, carved out of `ProxyConfig` (which builds it once: `config.routing()`).

Routing reads nothing else of the configuration; tests and benchmarks build a `Router` from these
values alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvblocks import BUILTIN_TOKENIZER

# `--tokenizer backend`: ask a backend's /tokenize instead of tokenizing locally.
BACKEND_TOKENIZER = "backend"


@dataclass(frozen=True)
class RoutingSettings:
    """Defaults match `ProxyConfig`'s; see its flags' help for each field."""

    strategy: str = "kv_aware"
    tokenizer: str = BUILTIN_TOKENIZER
    # Block hashing until the backends report theirs (vllm:cache_config_info).
    block_size: int = 16
    hash_algo: str = "sha256"
    default_capacity_blocks: int = 924
    default_max_tokens: int = 16
    max_model_len: int = 4096
    # The cost model: a `kvblocks.latency` profile and the backends' clock.
    profile: str = "a100-40gb-llama2-13b"
    time_scale: float = 1.0
    policy_param: tuple[str, ...] = ()
    kv_events_silence_timeout: float = 10.0
    # An adapter request may go to a backend of its base model without the adapter (loaded there first).
    lora_runtime_load: bool = False
