"""The proxy's configuration, in one place: dataclass defaults < config file < env vars < CLI flags.

Every CLI flag `--some-flag` is also the env var `KVROUTE_SOME_FLAG`; list flags (`--backend` or
`--backends`, `--api-key`) repeat or take comma-separated values (KVROUTE_BACKENDS=a,b). Defaults
reproduce the A100/Llama-2-13B setup.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .kv_events import KVEventSource

ENV_PREFIX = "KVROUTE_"


@dataclass
class ProxyConfig:
    """Everything `python -m proxy` and `start_proxy` need; field names match the CLI flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    backends: list[str] = field(default_factory=list)
    backends_file: str | None = None
    strategy: str = "kv_aware"
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    health_interval: float = 2.0
    metrics_interval: float = 1.0
    unhealthy_after: int = 2
    connect_timeout: float = 3.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 600.0
    # Resilience: retries before the first byte, with exponential backoff; a circuit breaker per backend.
    retries: int = 1
    retry_backoff: float = 0.05
    retry_backoff_max: float = 2.0
    breaker_failures: int = 5
    breaker_cooldown: float = 5.0
    breaker_successes: int = 2
    # Limits on what one client may ask (beyond them: an OpenAI-style 4xx).
    max_concurrent_per_key: int = 0
    max_header_bytes: int = 8190
    max_model_len: int = 4096
    # Routing model: what the cost-based policies assume a backend's GPU costs (emulator.latency
    # profile, also the embedded emulators' profile) and how fast the backends' clock runs.
    profile: str = "a100-40gb-llama2-13b"
    time_scale: float = 1.0
    default_capacity_blocks: int = 924
    default_max_tokens: int = 16
    tokenizer: str = "cl100k_base"
    block_size: int = 16
    hash_algo: str = "sha256"
    # Embedded emulators, started when no backend is configured.
    emulators: int = 4
    emulator_model: str | None = None
    log_format: str = "console"
    log_level: str = "info"
    # KV events: `--kv-events` pairs with `--backend` by position ("none" skips one); see kv_event_sources().
    kv_events: list[str] = field(default_factory=list)
    kv_events_silence_timeout: float = 10.0
    # Policy tunables, POLICY.NAME=VALUE (e.g. kv_aware.decode_weight=0.5); see each policy's class attributes.
    policy_param: list[str] = field(default_factory=list)
    # On SIGTERM: stop accepting, let in-flight requests finish for this long, then cancel them.
    shutdown_grace: float = 30.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.retries < 0 or self.retry_backoff < 0 or self.retry_backoff_max < 0:
            raise ValueError("retries, retry_backoff and retry_backoff_max must be >= 0")
        if self.breaker_failures < 1 or self.breaker_successes < 1 or self.breaker_cooldown < 0:
            raise ValueError("breaker_failures and breaker_successes must be >= 1, breaker_cooldown >= 0")
        if self.max_concurrent_per_key < 0:
            raise ValueError("max_concurrent_per_key must be >= 0 (0 = unlimited)")
        if self.max_header_bytes < 1024 or self.max_model_len < 2:
            raise ValueError("max_header_bytes must be >= 1024 and max_model_len >= 2")
        for name in ("connect_timeout", "first_byte_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        self.backends = [normalize_url(u) for u in self.backends]
        from emulator.latency import PROFILES

        from .policies import POLICIES

        if self.strategy not in POLICIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(POLICIES)}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown latency profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if len(self.kv_events) > len(self.backends):
            raise ValueError("more --kv-events than --backend flags (they pair by position; use 'none' to skip one)")
        for value in self.kv_events:
            if value.strip().lower() not in ("", "none"):
                KVEventSource.parse(value)
        from .policies import parse_policy_params

        parse_policy_params(self.policy_param)

    def all_backends(self) -> list[str]:
        """Backends from the flag list plus the backends file."""
        return list(dict.fromkeys([*self.backends, *(url for url, _ in self._file_backends())]))

    def kv_event_sources(self) -> dict[str, KVEventSource]:
        """Backends that publish vLLM KV events, with where to subscribe (their index part becomes exact)."""
        out: dict[str, KVEventSource] = {}
        for url, value in zip(self.backends, self.kv_events):
            if value.strip().lower() not in ("", "none"):
                out[url] = KVEventSource.parse(value)
        for url, source in self._file_backends():
            if source is not None:
                out[url] = source
        return out

    def _file_backends(self) -> list[tuple[str, KVEventSource | None]]:
        """The backends file: one URL per line (# comments), or a JSON list of URLs /
        `{"url": ..., "kv_events": "ENDPOINT" | {"endpoint", "topic", "replay_endpoint"}}`."""
        if not self.backends_file:
            return []
        with open(self.backends_file, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            entries = json.loads(text)
            out: list[tuple[str, KVEventSource | None]] = []
            for e in entries:
                if isinstance(e, str):
                    out.append((normalize_url(e), None))
                elif isinstance(e, dict) and isinstance(e.get("url"), str):
                    ev = e.get("kv_events")
                    out.append((normalize_url(e["url"]), KVEventSource.parse(ev) if ev else None))
                else:
                    raise ValueError(f"{self.backends_file}: each entry must be a URL or {{\"url\": ..., \"kv_events\": ...}}")
            return out
        urls = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append((normalize_url(line), None))
        return urls

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ProxyConfig:
        """Parse flags; each unset flag falls back to `KVROUTE_<FLAG>`, then `--config FILE.json`, then default."""
        env = os.environ if env is None else env
        parser = _build_parser()
        ns = parser.parse_args(argv)
        values: dict[str, Any] = {}
        config_file = ns.config or env.get(ENV_PREFIX + "CONFIG")
        if config_file:
            with open(config_file, encoding="utf-8") as f:
                file_values = json.load(f)
            if not isinstance(file_values, dict):
                parser.error(f"{config_file}: expected a JSON object")
            unknown = set(file_values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                parser.error(f"{config_file}: unknown keys {sorted(unknown)}")
            values.update(file_values)
        for f in dataclasses.fields(cls):
            cli_value = getattr(ns, f.name, None)
            env_names = [ENV_PREFIX + n.upper() for n in dict.fromkeys((_FLAG_NAMES.get(f.name, f.name), f.name))]
            env_name = next((n for n in env_names if n in env), None)
            if cli_value is not None:
                if _field_kind(f) is list:
                    cli_value = [x.strip() for v in cli_value for x in v.split(",") if x.strip()]
                values[f.name] = cli_value
            elif env_name is not None:
                values[f.name] = _from_env(f, env[env_name], parser, env_name)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            parser.error(str(e))
            raise  # unreachable: parser.error exits


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


# Dataclass field -> CLI flag stem (and env suffix) when they differ.
_FLAG_NAMES = {"backends": "backend", "api_keys": "api_key"}
_HELP = {
    "backends": "backend base URL (repeatable); none = start embedded emulators",
    "backends_file": "file with one backend URL per line",
    "strategy": "routing strategy (see /admin/strategy); default: load-aware prefix routing",
    "api_keys": "client API key accepted as 'Authorization: Bearer KEY' (repeatable)",
    "admin_key": "key guarding /admin/ (Bearer)",
    "emulators": "number of embedded emulators when no backend is given",
    "profile": "latency profile of the backends (routing cost model; embedded emulators use it too)",
    "time_scale": "backends' time scale (emulator --time-scale); embedded emulators use it too",
    "log_format": "console or json",
    "tokenizer": "cl100k_base (built in), a Hugging Face tokenizer folder, or 'backend' (each prompt through a backend's /tokenize, cached)",
    "block_size": "tokens per KV block until the backends report theirs (vllm:cache_config_info), then theirs",
    "hash_algo": "sha256 or sha256_cbor until the backends report theirs (prefix_caching_hash_algo), then theirs",
    "kv_events": "KV-event source of the --backend at the same position: ENDPOINT[?topic=T&replay=ENDPOINT] "
    "(as reachable from the proxy; 'none' to skip); makes that backend's prefix index exact",
    "connect_timeout": "seconds to open a backend connection before trying another backend",
    "first_byte_timeout": "seconds a backend may take to its first streamed byte (whole body if not streaming) before a retry",
    "idle_timeout": "seconds a started stream may stay silent before it ends with an SSE error event",
    "retries": "extra attempts on other backends when one fails before the first byte (default 1)",
    "retry_backoff": "first retry's backoff in seconds; doubles per retry, with jitter",
    "retry_backoff_max": "cap of the retry backoff in seconds",
    "breaker_failures": "failed requests in a row that open a backend's circuit breaker",
    "breaker_cooldown": "seconds an open breaker keeps its backend out before probing it",
    "breaker_successes": "successful probes that close a half-open breaker",
    "max_concurrent_per_key": "requests one API key may have in flight (0 = unlimited); beyond: 429",
    "max_header_bytes": "longest request line / header field accepted; beyond: 431",
    "max_model_len": "context length assumed for a backend whose /v1/models does not say (prompt + max_tokens beyond: 400)",
    "shutdown_grace": "seconds in-flight requests may take to finish after SIGTERM before they are cancelled",
    "policy_param": "a routing policy's tunable, POLICY.NAME=VALUE (repeatable), e.g. kv_aware.decode_weight=0.5",
    "kv_events_silence_timeout": "seconds a busy backend may publish no KV event before its index falls back to approximate",
}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy",
        description="kvroute: KV-cache-aware OpenAI/vLLM-compatible proxy. Every flag is also env KVROUTE_<FLAG>.",
    )
    p.add_argument("--config", help="JSON file with ProxyConfig fields")
    for f in dataclasses.fields(ProxyConfig):
        flags = ["--" + n.replace("_", "-") for n in dict.fromkeys((_FLAG_NAMES.get(f.name, f.name), f.name))]
        kind = _field_kind(f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _HELP.get(f.name)}
        if kind is list:
            kwargs["action"] = "append"
        elif kind is not str:
            kwargs["type"] = kind
        p.add_argument(*flags, **kwargs)
    return p


def _field_kind(f: dataclasses.Field) -> type:
    t = str(f.type)
    if t.startswith("list"):
        return list
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def _from_env(f: dataclasses.Field, raw: str, parser: argparse.ArgumentParser, name: str) -> Any:
    kind = _field_kind(f)
    if kind is list:
        return [x.strip() for x in raw.split(",") if x.strip()]
    try:
        return kind(raw)
    except ValueError:
        parser.error(f"{name}={raw!r}: expected {kind.__name__}")
        raise
