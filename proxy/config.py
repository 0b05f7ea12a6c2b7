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
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvblocks import BUILTIN_TOKENIZER, HASH_ALGOS
from kvblocks.cli import ArgumentParser, ConfigValueError, UsageError, exit_on_usage_error, load_dataclass, with_default

from .backend_url import BadBackendURL, check_backend_url
from .backends.circuit_breaker import CircuitBreaker
from .index.kv_events import KVEventSource
from .routing.settings import BACKEND_TOKENIZER, RoutingSettings
from .upstream.settings import ForwardSettings, MonitorSettings

ENV_PREFIX = "KVROUTE_"
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ProxyConfig:
    """Everything `python -m proxy` and `start_proxy` need; field names match the CLI flags."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 = every interface"})
    port: int = field(default=8000, metadata={"help": "port to listen on; 0 = OS-assigned (printed at start-up)"})
    backends: list[str] = field(default_factory=list, metadata={"help": (
        "backend base URL: scheme://host:port[/path-prefix], no credentials or query (repeatable); none ="
        " start embedded emulators"
    )})
    backends_file: str | None = field(default=None, metadata={"help": (
        "file with one backend URL per line (# comments), or a JSON list of URLs or {\"url\": URL, "
        "\"kv_events\": ENDPOINT | {\"endpoint\", \"topic\", \"replay_endpoint\"}}"
    )})
    strategy: str = field(default="kv_aware", metadata={"help": (
        "routing strategy (switch at run time: PUT /admin/strategy)"
    )})
    api_keys: list[str] = field(default_factory=list, repr=False, metadata={"help": (
        "client API key accepted as 'Authorization: Bearer KEY' (repeatable)"
    )})
    # The admin API's key: the value, or a file holding it (see proxy/admin_auth.py for who may call without one).
    admin_key: str | None = field(default=None, repr=False, metadata={"help": (
        "key guarding /admin/ (Bearer); without one the admin API is open to local users when bound to "
        "loopback, and refused to everyone otherwise (prefer --admin-key-file or KVROUTE_ADMIN_KEY: flags"
        " show in ps)"
    )})
    admin_key_file: str | None = field(default=None, metadata={"help": (
        "file whose first line is the admin key (a mounted secret)"
    )})
    # False: POST /admin/backends is refused (only the configured backends are ever called).
    runtime_backends: bool = field(default=True, metadata={"help": (
        "allow POST /admin/backends to add backends at run time (--no-runtime-backends forbids it)"
    )})
    # Sent upstream (Authorization: Bearer) to backends without a key of their own in the backends file.
    backend_api_key: str | None = field(default=None, repr=False, metadata={"help": (
        "API key the proxy sends upstream (Authorization: Bearer) to backends started with --api-key; a "
        "backends-file entry's api_key / api_key_env overrides it per backend; never logged"
    )})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": (
        "largest request body accepted; beyond: 413"
    )})
    health_interval: float = field(default=2.0, metadata={"help": (
        "seconds between health checks (GET /health) of each backend"
    )})
    metrics_interval: float = field(default=1.0, metadata={"help": (
        "seconds between scrapes of each backend's /metrics"
    )})
    unhealthy_after: int = field(default=2, metadata={"help": (
        "failed health checks in a row that take a backend out of routing"
    )})
    connect_timeout: float = field(default=3.0, metadata={"help": (
        "seconds to open a backend connection before trying another backend"
    )})
    first_byte_timeout: float = field(default=300.0, metadata={"help": (
        "seconds a backend may take to its first streamed byte (whole body if not streaming) before a "
        "retry"
    )})
    idle_timeout: float = field(default=600.0, metadata={"help": (
        "seconds a started stream may stay silent before it ends with an SSE error event"
    )})
    # Resilience: retries before the first byte, with exponential backoff; a circuit breaker per backend.
    retries: int = field(default=1, metadata={"help": (
        "extra attempts on other backends when one fails before the first byte"
    )})
    retry_backoff: float = field(default=0.05, metadata={"help": (
        "first retry's backoff in seconds; doubles per retry, with jitter"
    )})
    retry_backoff_max: float = field(default=2.0, metadata={"help": "cap of the retry backoff in seconds"})
    breaker_failures: int = field(default=5, metadata={"help": (
        "failed requests in a row that open a backend's circuit breaker"
    )})
    breaker_cooldown: float = field(default=5.0, metadata={"help": (
        "seconds an open breaker keeps its backend out before probing it"
    )})
    breaker_successes: int = field(default=2, metadata={"help": "successful probes that close a half-open breaker"})
    # Limits on what one client may ask (beyond them: an OpenAI-style 4xx).
    max_concurrent_per_key: int = field(default=0, metadata={"help": (
        "requests one API key may have in flight (0 = unlimited); beyond: 429"
    )})
    max_header_bytes: int = field(default=8190, metadata={"help": (
        "longest request line / header field accepted; beyond: 431"
    )})
    max_model_len: int = field(default=4096, metadata={"help": (
        "context length assumed for a backend whose /v1/models does not say (prompt + max_tokens beyond: "
        "400)"
    )})
    # The edge's bounds: a client's head must arrive (and its body keep arriving) within
    # client_read_timeout; a non-streamed backend answer larger than max_response_bytes is a 502.
    client_read_timeout: float = field(default=60.0, metadata={"help": (
        "seconds a client may take to send a request head, or pause mid-body, before 408"
    )})
    # An idle keep-alive client connection is closed after this long, whichever server parsed it.
    client_keepalive_timeout: float = field(default=75.0, metadata={"help": (
        "seconds an idle keep-alive client connection is kept open"
    )})
    max_response_bytes: int = field(default=64 * 1024 * 1024, metadata={"help": (
        "largest non-streamed backend answer relayed; beyond: 502"
    )})
    # Routing model: what the cost-based policies assume a backend's GPU costs (kvblocks.latency
    # profile, also the embedded emulators' profile) and how fast the backends' clock runs.
    profile: str = field(default="a100-40gb-llama2-13b", metadata={"help": (
        "latency profile of the backends (routing cost model; embedded emulators use it too)"
    )})
    time_scale: float = field(default=1.0, metadata={"help": (
        "backends' time scale (emulator --time-scale); embedded emulators use it too"
    )})
    default_capacity_blocks: int = field(default=924, metadata={"help": (
        "KV blocks assumed per backend until its vllm:cache_config_info says"
    )})
    default_max_tokens: int = field(default=16, metadata={"help": (
        "max_tokens assumed for a request that gives none (routing cost)"
    )})
    tokenizer: str = field(default="cl100k_base", metadata={"help": (
        "cl100k_base (built in), a Hugging Face tokenizer folder, or 'backend' (each prompt through a "
        "backend's /tokenize, cached)"
    )})
    block_size: int = field(default=16, metadata={"help": (
        "tokens per KV block until the backends report theirs (vllm:cache_config_info), then theirs"
    )})
    hash_algo: str = field(default="sha256", metadata={"help": (
        "sha256 or sha256_cbor until the backends report theirs (prefix_caching_hash_algo), then theirs"
    )})
    # Embedded emulators, started when no backend is configured.
    emulators: int = field(default=4, metadata={"help": "number of embedded emulators when no backend is given"})
    emulator_model: str | None = field(default=None, metadata={"help": (
        "model name the embedded emulators serve (default: the emulator's)"
    )})
    log_format: str = field(default="console", metadata={"help": (
        "log lines for a terminal, or one JSON object per line (containers)"
    )})
    log_level: str = field(default="info", metadata={"help": "lowest level logged"})
    access_log: bool = field(default=False, metadata={"help": (
        "one log line per proxied request (backend, strategy, matched blocks, status, latency, request "
        "id)"
    )})
    # KV events: `--kv-events` pairs with `--backend` by position ("none" skips one); see kv_event_sources().
    kv_events: list[str] = field(default_factory=list, metadata={"help": (
        "KV-event source of the --backend at the same position: ENDPOINT[?topic=T&replay=ENDPOINT] (as "
        "reachable from the proxy; 'none' to skip); makes that backend's prefix index exact"
    )})
    kv_events_silence_timeout: float = field(default=10.0, metadata={"help": (
        "seconds a busy backend may publish no KV event before its index falls back to approximate"
    )})
    # Policy tunables, POLICY.NAME=VALUE (e.g. kv_aware.decode_weight=0.5); see each policy's class attributes.
    policy_param: list[str] = field(default_factory=list, metadata={"help": (
        "a routing policy's tunable, POLICY.NAME=VALUE (repeatable), e.g. kv_aware.decode_weight=0.5"
    )})
    # Session keys (proxy/routing/session.py): the header naming a client's session ("" = none), and
    # whether the OpenAI `user` field names one when the header is absent.
    session_header: str = field(default="x-session-id", metadata={"help": (
        "request header whose value names a client session: its requests stay on one backend unless that "
        "costs kv_aware.session_valve_s more ('' = off)"
    )})
    session_user_field: bool = field(default=False, metadata={"help": (
        "also take the session from the OpenAI 'user' field when the header is absent"
    )})
    # LoRA: an adapter request may go to a backend of its base model that has not loaded it; the proxy
    # loads it there first (POST /v1/load_lora_adapter; vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).
    lora_runtime_load: bool = field(default=False, metadata={"help": (
        "let an adapter request go to a backend of its base model without the adapter, loading it there "
        "first (/v1/load_lora_adapter); kv_aware charges kv_aware.lora_load_s, more without a free "
        "adapter slot"
    )})
    # On SIGTERM: stop accepting, let in-flight requests finish for this long, then cancel them.
    shutdown_grace: float = field(default=30.0, metadata={"help": (
        "seconds in-flight requests may take to finish after SIGTERM before they are cancelled"
    )})
    # Replicas that share what they route (proxy/replicas/): this one's PUB address and its peers'.
    peers: list[str] = field(default_factory=list, metadata={"help": (
        "another replica of this proxy to share routing facts with (repeatable): its --replica-bind "
        "address tcp://HOST:PORT, ipc://PATH, or dns://NAME:PORT for every address a name resolves to (a "
        "headless Service)"
    )})
    replica_bind: str | None = field(default=None, metadata={"help": (
        "ZMQ address this replica publishes its routing facts on, e.g. tcp://*:5600 (default with a "
        "dns:// peer: tcp://*:ITS_PORT); its replay socket binds the next port (ephemeral for port *)"
    )})
    replica_heartbeat: float = field(default=0.5, metadata={"help": (
        "seconds between a replica's messages when idle; a peer silent for 3x this is lost"
    )})
    # `--workers N|auto`: N processes on one port (SO_REUSEPORT), each a replica of the others over ipc://.
    workers: str = field(default="1", metadata={"help": (
        "proxy processes sharing the port (SO_REUSEPORT), each a replica of the others; auto = cores"
    )})
    reuse_port: bool = field(default=False, metadata={"help": (
        "bind the port with SO_REUSEPORT so several proxies can share it (--workers sets it)"
    )})

    def __post_init__(self) -> None:
        E = ConfigValueError
        if self.block_size < 1:
            raise E("block_size", "must be >= 1")
        if self.shutdown_grace < 0:
            raise E("shutdown_grace", "must be >= 0")
        if self.max_body_bytes < 1024:
            raise E("max_body_bytes", "must be >= 1024")
        for name in ("retries", "retry_backoff", "retry_backoff_max", "breaker_cooldown"):
            if getattr(self, name) < 0:
                raise E(name, "must be >= 0")
        for name in ("breaker_failures", "breaker_successes", "emulators", "unhealthy_after"):
            if getattr(self, name) < 1:
                raise E(name, "must be >= 1")
        if self.max_concurrent_per_key < 0:
            raise E("max_concurrent_per_key", "must be >= 0 (0 = unlimited)")
        for name, least in (("max_header_bytes", 1024), ("max_model_len", 2), ("max_response_bytes", 1024)):
            if getattr(self, name) < least:
                raise E(name, f"must be >= {least}")
        for name in ("connect_timeout", "first_byte_timeout", "idle_timeout", "client_read_timeout", "time_scale",
                     "client_keepalive_timeout",
                     "health_interval", "metrics_interval", "kv_events_silence_timeout"):
            if not getattr(self, name) > 0:
                raise E(name, f"must be > 0 (got {getattr(self, name)})")
        if not 0 <= self.port <= 65535:
            raise E("port", f"must be within 0..65535 (got {self.port})")
        if self.hash_algo not in HASH_ALGOS:
            raise E("hash_algo", f"must be one of {', '.join(HASH_ALGOS)}, not {self.hash_algo!r}")
        if self.log_format not in LOG_FORMATS:
            raise E("log_format", f"must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise E("log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.tokenizer not in (BUILTIN_TOKENIZER, BACKEND_TOKENIZER) and not os.path.exists(self.tokenizer):
            raise E("tokenizer", f"{self.tokenizer!r}: no such Hugging Face tokenizer folder or file; "
                    f"use {BUILTIN_TOKENIZER}, {BACKEND_TOKENIZER} or a tokenizer folder")
        self.backends = [normalize_url(u) for u in self.backends]
        if self.admin_key_file:
            if self.admin_key:
                raise E("admin_key_file", "cannot be used with --admin-key; give the admin key one way")
            self.admin_key = read_key_file(self.admin_key_file, "admin_key_file")
        elif self.admin_key is not None and not self.admin_key.strip():
            raise E("admin_key", "must not be empty")
        if self.backends_file:
            try:
                self._file_backends()
            except FileNotFoundError:
                raise E("backends_file", f"{self.backends_file}: no such file") from None
            except (OSError, ValueError, UsageError) as e:
                raise E("backends_file", f"{self.backends_file}: {e}") from None
        from kvblocks.latency import PROFILES

        from .routing.policies import POLICIES

        if self.strategy not in POLICIES:
            raise E("strategy", f"unknown strategy {self.strategy!r}; choose one of {', '.join(POLICIES)}")
        if self.profile not in PROFILES:
            raise E("profile", f"unknown latency profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if len(self.kv_events) > len(self.backends):
            raise E("kv_events", "more --kv-events than --backend flags (they pair by position; use 'none' to skip one)")
        for value in self.kv_events:
            if value.strip().lower() not in ("", "none"):
                KVEventSource.parse(value)
        from .routing.policies import parse_policy_params

        parse_policy_params(self.policy_param)
        self._check_replicas()

    def _check_replicas(self) -> None:
        from .replicas.sync import parse_peer

        E = ConfigValueError
        try:
            self.peers = [parse_peer(p) for p in self.peers]
        except ValueError as e:
            raise E("peers", str(e)) from None
        if self.replica_bind is not None:
            scheme, _, rest = self.replica_bind.partition("://")
            if scheme not in ("tcp", "ipc") or not rest or (scheme == "tcp" and not rest.rpartition(":")[2]):
                raise E("replica_bind", f"{self.replica_bind!r} must be a ZMQ address to bind, such as "
                        "tcp://*:5600 or ipc:///run/kvroute/replica-0")
        elif self.peers and not self.replica_bind_address():
            raise E("replica_bind", "is needed with peers (where this replica publishes for them, e.g. tcp://*:5600)")
        if not self.replica_heartbeat > 0:
            raise E("replica_heartbeat", f"must be > 0 (got {self.replica_heartbeat})")
        self.worker_count()

    def replica_bind_address(self) -> str | None:
        """Where this replica publishes: --replica-bind, else the port of a dns:// peer on every interface."""
        if self.replica_bind:
            return self.replica_bind
        for p in self.peers:
            if p.startswith("dns://"):
                return f"tcp://*:{p.rpartition(':')[2]}"
        return None

    def worker_count(self) -> int:
        """--workers as a number (auto = the cores this process may run on)."""
        w = str(self.workers).strip().lower()
        if w == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        if not w.isdigit() or int(w) < 1:
            raise ConfigValueError("workers", f"must be a number >= 1 or auto (got {self.workers!r})")
        return int(w)

    # -- each component's own settings (built once, by the app) ---------------------------------------
    def routing(self) -> RoutingSettings:
        """What `routing.Router` needs."""
        return RoutingSettings(
            strategy=self.strategy, tokenizer=self.tokenizer, block_size=self.block_size, hash_algo=self.hash_algo,
            default_capacity_blocks=self.default_capacity_blocks, default_max_tokens=self.default_max_tokens,
            max_model_len=self.max_model_len, profile=self.profile, time_scale=self.time_scale,
            policy_param=tuple(self.policy_param), kv_events_silence_timeout=self.kv_events_silence_timeout,
            lora_runtime_load=self.lora_runtime_load,
        )

    def new_breaker(self) -> CircuitBreaker:
        """A backend's circuit breaker with these settings (the registry's factory)."""
        return CircuitBreaker(self.breaker_failures, self.breaker_cooldown, self.breaker_successes)

    def forwarding(self) -> ForwardSettings:
        """What `upstream.forward.Forwarder` needs."""
        return ForwardSettings(
            first_byte_timeout=self.first_byte_timeout, retries=self.retries, retry_backoff=self.retry_backoff,
            retry_backoff_max=self.retry_backoff_max, access_log=self.access_log,
        )

    def monitoring(self) -> MonitorSettings:
        """What `upstream.health.BackendMonitor` needs."""
        return MonitorSettings(
            health_interval=self.health_interval, metrics_interval=self.metrics_interval,
            unhealthy_after=self.unhealthy_after,
        )

    def all_backends(self) -> list[str]:
        """Backends from the flag list plus the backends file."""
        return list(dict.fromkeys([*self.backends, *(e.url for e in self._file_backends())]))

    def kv_event_sources(self) -> dict[str, KVEventSource]:
        """Backends that publish vLLM KV events, with where to subscribe (their index part becomes exact)."""
        out: dict[str, KVEventSource] = {}
        for url, value in zip(self.backends, self.kv_events):
            if value.strip().lower() not in ("", "none"):
                out[url] = KVEventSource.parse(value)
        for e in self._file_backends():
            if e.kv_events is not None:
                out[e.url] = e.kv_events
        return out

    def backend_api_keys(self) -> dict[str, str]:
        """The key each backend is sent (its own from the backends file, else --backend-api-key)."""
        out = {url: self.backend_api_key for url in self.all_backends() if self.backend_api_key}
        for e in self._file_backends():
            if e.api_key:
                out[e.url] = e.api_key
        return out

    def _file_backends(self) -> list[FileBackend]:
        """The backends file: one URL per line (# comments), or a JSON list of URLs /
        `{"url": ..., "kv_events": "ENDPOINT" | {"endpoint", "topic", "replay_endpoint"},
        "api_key": KEY | "api_key_env": ENV_VAR}`."""
        if not self.backends_file:
            return []
        with open(self.backends_file, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            return [FileBackend.parse(e, self.backends_file) for e in json.loads(text)]
        urls = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(FileBackend(normalize_url(line)))
        return urls

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ProxyConfig:
        """Parse flags; each unset flag falls back to `KVROUTE_<FLAG>`, then `--config FILE.json`, then default.
        A mistake is one line naming the flag or env var, and SystemExit(2)."""
        env = os.environ if env is None else env
        parser = _build_parser()
        ns = parser.parse_args(argv)
        with exit_on_usage_error(parser.prog):
            config_file = None
            if ns.config:
                config_file = ("--config", ns.config)
            elif env.get(ENV_PREFIX + "CONFIG"):
                config_file = (ENV_PREFIX + "CONFIG", env[ENV_PREFIX + "CONFIG"])
            return load_dataclass(
                cls, ns, env,
                env_names=lambda f: [ENV_PREFIX + n.upper() for n in dict.fromkeys((_FLAG_NAMES.get(f.name, f.name), f.name))],
                kind_of=_field_kind,
                config_file=config_file,
                aliases=_FLAG_NAMES,
                from_cli=lambda f, v: [x.strip() for s in v for x in s.split(",") if x.strip()] if _field_kind(f) is list else v,
            )
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class FileBackend:
    """One entry of a JSON backends file."""

    url: str
    kv_events: KVEventSource | None = None
    api_key: str | None = field(default=None, repr=False)  # never in logs or reprs

    @classmethod
    def parse(cls, e: Any, where: str) -> FileBackend:
        if isinstance(e, str):
            return cls(normalize_url(e))
        if not isinstance(e, dict) or not isinstance(e.get("url"), str):
            raise ValueError(f'{where}: each entry must be a URL or {{"url": ..., "kv_events": ..., "api_key": ...}}')
        url = normalize_url(e["url"])  # first: the messages below name the backend, never its raw text
        unknown = sorted(set(e) - {"url", "kv_events", "api_key", "api_key_env"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for backend {url}")
        key = e.get("api_key")
        env_name = e.get("api_key_env")
        if env_name is not None:
            if key is not None:
                raise ValueError(f"{where}: backend {url} has both api_key and api_key_env")
            key = os.environ.get(env_name) if isinstance(env_name, str) else None
            if not key:
                raise ValueError(f"{where}: backend {url}: env var {env_name} (its api_key_env) is not set")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"{where}: backend {url}: api_key must be a non-empty string")
        ev = e.get("kv_events")
        return cls(url, KVEventSource.parse(ev) if ev else None, key)


def normalize_url(url: str) -> str:
    """`host:port` -> `http://host:port`; anything but scheme + host + port (+ a plain path prefix) is
    a ValueError naming --backend (`backend_url.check_backend_url` says what a backend URL may be)."""
    try:
        return check_backend_url(url)
    except BadBackendURL as e:
        raise ValueError(f"backends: {e}") from None


def read_key_file(path: str, name: str) -> str:
    """A key kept in a file (a mounted secret): its first line, stripped; an unreadable or empty file
    is a UsageError naming the flag (not a ValueError: the path must not be rewritten into flag
    names), never the key."""
    flag = "--" + name.replace("_", "-")
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(flag, f"{path}: cannot read it ({type(e).__name__})") from None
    if not key:
        raise UsageError(flag, f"{path}: the file is empty")
    return key


# Dataclass field -> CLI flag stem (and env suffix) when they differ.
_FLAG_NAMES = {"backends": "backend", "api_keys": "api_key", "peers": "peer"}
def _choices(name: str) -> tuple[str, ...] | None:
    from kvblocks.latency import PROFILES

    from .routing.policies import POLICIES

    return {"strategy": tuple(POLICIES), "profile": tuple(PROFILES), "hash_algo": tuple(HASH_ALGOS),
            "log_format": LOG_FORMATS, "log_level": LOG_LEVELS}.get(name)


_FIELDS = {f.name: f for f in dataclasses.fields(ProxyConfig)}
_HINTS = typing.get_type_hints(ProxyConfig)


def _help(name: str) -> str | None:
    """A flag's help: its field's metadata (the text sits with the field it describes)."""
    if name == "policy_param":  # the tunables that exist, with their defaults (they live on the policy classes)
        from .routing.policies import tunables_text

        return f"{_FIELDS[name].metadata['help']}. Tunables (default): {tunables_text()}".replace("%", "%%")
    return _FIELDS[name].metadata.get("help")


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m proxy",
        description="kvroute: KV-cache-aware OpenAI/vLLM-compatible proxy.",
        epilog="Every flag --some-flag is also the env var KVROUTE_SOME_FLAG; precedence: "
        "defaults < --config file < env vars < flags. List flags repeat or take comma-separated values.",
    )
    p.add_argument("--config", help="JSON file with ProxyConfig fields (keys = flag names with _); default: none")
    for f in dataclasses.fields(ProxyConfig):
        flags = ["--" + n.replace("_", "-") for n in dict.fromkeys((_FLAG_NAMES.get(f.name, f.name), f.name))]
        kind = _field_kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = _choices(f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": with_default(_help(f.name), default, choices)}
        if choices and f.name != "log_level":
            kwargs["choices"] = choices
            kwargs["metavar"] = f.name.upper()
        if kind is list:
            kwargs["action"] = "append"
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is not str:
            kwargs["type"] = kind
        p.add_argument(*flags, **kwargs)
    return p


def _field_kind(f: dataclasses.Field) -> type:
    """The flag's value type from the field's annotation (`X | None` is X; str when nothing else fits)."""
    t = _HINTS[f.name]
    args = [x for x in typing.get_args(t) if x is not type(None)]
    t = typing.get_origin(t) or t
    if t in (typing.Union, types.UnionType) and len(args) == 1:
        t = typing.get_origin(args[0]) or args[0]
    return t if t in (bool, list, int, float) else str
