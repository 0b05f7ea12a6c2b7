"""The emulator's configuration in one place: defaults, CLI flags, env vars and a JSON file.

Precedence: CLI flag > env var `KVROUTE_EMU_<FLAG>` > `--config FILE.json` > dataclass default.
Defaults reproduce one vLLM server running Llama-2-13B on an A100 40GB.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from kvblocks import HASH_ALGOS
from kvblocks.cli import ArgumentParser, exit_on_usage_error, json_object, load_dataclass
from kvblocks.latency import DEFAULT_PROFILE, PROFILES

from .model_spec import DEFAULT_GPU, DEFAULT_MODEL, GPUS, MODELS, num_gpu_blocks
from .output_length import DEFAULT_NATURAL_LENGTH, FORMS, parse_length_distribution

ENV_PREFIX = "KVROUTE_EMU_"
ENGINES = ("batched", "simple")
LOG_FORMATS = ("console", "json")


@dataclass
class EmulatorConfig:
    """Everything one emulated vLLM server (or a group of replicas) is configured with."""

    host: str = "127.0.0.1"
    port: int = 8001
    replicas: int = 1
    model: str = DEFAULT_MODEL
    gpu: str = DEFAULT_GPU
    gpu_memory_utilization: float = 0.9
    profile: str = DEFAULT_PROFILE
    engine: str = "batched"
    time_scale: float = 1.0
    num_gpu_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int = 4096
    seed: int = 0
    eos_probability: float = 0.0
    # Output length (EOS) of a request without max_tokens (emulator.output_length); "off": to the cap.
    natural_length: str = DEFAULT_NATURAL_LENGTH
    prefix_caching_hash_algo: str = "sha256"
    enable_prompt_tokens_details: bool = True
    log_format: str = "console"
    log_requests: bool = True
    version: str = "0.32.0"  # the vLLM release the emulator answers as (real servers in our tests run 0.32)
    kv_events_config: dict[str, Any] | None = None
    # LoRA (emulator.lora): adapters served beside the base model as NAME=PATH, how many may run in one
    # step, and the emulated seconds a step pays to bring an adapter into a slot it was not in.
    # Further names the model answers to (vLLM's `--served-model-name A B`: every name is accepted and
    # listed in /v1/models; answers and metrics use the first, `model`).
    served_model_aliases: list[str] = field(default_factory=list)
    enable_lora: bool = False  # implied by lora_modules; without either, /v1/load_lora_adapter is refused
    lora_modules: list[str] = field(default_factory=list)
    max_loras: int = 1
    lora_load_s: float = 0.0
    # Fault injection (emulator.faults), all off by default; rates are per request, times wall seconds.
    fault_error_rate: float = 0.0
    fault_error_status: int = 503
    fault_latency_spike_rate: float = 0.0
    fault_latency_spike: float = 0.0
    fault_hang_rate: float = 0.0
    fault_cut_rate: float = 1.0
    fault_cut_after: int | None = None
    fault_crash_after: int | None = None
    fault_slow_start: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject settings the emulator cannot honour, with a message naming the setting."""
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown latency profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if not self.time_scale > 0:
            raise ValueError("time_scale must be > 0 (use profile 'zero' for no latency)")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_model_len < 2 or self.replicas < 1:
            raise ValueError("block_size, max_num_seqs, replicas must be >= 1 and max_model_len >= 2")
        if not 0 <= self.eos_probability <= 1:
            raise ValueError("eos_probability must be within [0, 1]")
        parse_length_distribution(self.natural_length)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be within (0, 1]")
        if self.num_gpu_blocks is None:
            if self.model not in MODELS:
                raise ValueError(f"unknown model {self.model!r} for capacity; pass num_gpu_blocks or use one of {', '.join(MODELS)}")
            if self.gpu not in GPUS:
                raise ValueError(f"unknown gpu {self.gpu!r}; choose one of {', '.join(GPUS)}")
        elif self.num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is vLLM's null block)")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.engine == "batched" and self.resolved_max_num_batched_tokens < self.max_num_seqs:  # vLLM's check
            raise ValueError(f"max_num_batched_tokens ({self.resolved_max_num_batched_tokens}) must be greater than "
                             f"or equal to max_num_seqs ({self.max_num_seqs}).")
        usable = self.resolved_num_gpu_blocks - 1
        if -(-self.max_model_len // self.block_size) > usable:
            # vLLM refuses to start when one request of max_model_len tokens cannot fit the cache.
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit the KV cache: {usable} usable blocks of "
                f"{self.block_size} tokens hold {usable * self.block_size} tokens; lower --max-model-len "
                f"to at most {usable * self.block_size} or raise --num-gpu-blocks")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")
        if self.max_loras < 1 or self.lora_load_s < 0:
            raise ValueError("max_loras must be >= 1 and lora_load_s >= 0")
        from .lora import parse_lora_module

        for spec in self.lora_modules:
            parse_lora_module(spec)
        if self.kv_events_config is not None:
            from .kv_events import KVEventsConfig

            KVEventsConfig.from_dict(self.kv_events_config)
        from .faults import FaultConfig

        FaultConfig.from_emulator(self)

    @property
    def resolved_num_gpu_blocks(self) -> int:
        """vLLM's num_gpu_blocks: explicit, or derived from model and GPU memory (924 by default)."""
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        return num_gpu_blocks(MODELS[self.model], GPUS[self.gpu], self.block_size, self.gpu_memory_utilization)

    @property
    def resolved_max_num_batched_tokens(self) -> int:
        """Token budget of one engine step: explicit, or vLLM's API-server default for the GPU
        (8192 on cards with >= 70 GiB that are not A100s, else 2048; vllm/engine/arg_utils.py)."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        gpu = GPUS.get(self.gpu)
        if gpu is not None and gpu.memory_bytes >= 70 * 1024**3 and "a100" not in gpu.name:
            return 8192
        return 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> EmulatorConfig:
        """Build from `--config FILE.json`, then env vars, then CLI flags (each overriding the last).
        A mistake is one line naming the flag or env var, and SystemExit(2)."""
        parser = build_parser()
        args = parser.parse_args(argv)
        if isinstance(args.model, list):  # --served-model-name A B: A is the model, B an alias
            args.model, aliases = args.model[0], args.model[1:]
            if aliases:
                args.served_model_aliases = aliases
        env = os.environ if env is None else env
        with exit_on_usage_error(parser.prog):
            return load_dataclass(
                cls, args, env,
                env_names=lambda f: [ENV_PREFIX + f.name.upper()],
                kind_of=_kind,
                config_file=("--config", args.config) if args.config else None,
            )
        raise AssertionError("unreachable")


_BOOL_FIELDS = {"enable_prompt_tokens_details", "log_requests", "enable_lora"}
_JSON_FIELDS = {"kv_events_config"}


def _field_type(name: str) -> type:
    default = {f.name: f for f in fields(EmulatorConfig)}[name].default
    if default is MISSING or default is None:
        return {"num_gpu_blocks": int, "max_num_batched_tokens": int, "fault_cut_after": int,
                "fault_crash_after": int, "lora_modules": list, "served_model_aliases": list}.get(name, str)
    return type(default)


def _kind(f: Field) -> type:
    if f.name in _BOOL_FIELDS:
        return bool
    if f.name in _JSON_FIELDS:
        return dict
    return _field_type(f.name)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m emulator",
        description="Emulated vLLM server(s): OpenAI API, vLLM metrics, prefix cache, continuous batching.",
        epilog=f"Every flag can also be set as env var {ENV_PREFIX}<FLAG_IN_UPPER_SNAKE>, e.g. {ENV_PREFIX}PORT=8001.",
    )
    a = p.add_argument
    a("--config", help="JSON file with config fields (overridden by env vars and flags; default: none)")
    a("--host", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, help="first port; replica i listens on port+i; 0 = OS-assigned (default 8001)")
    a("--replicas", type=int, help="number of emulated servers, one port each (default 1)")
    a("--model", "--served-model-name", dest="model", nargs="+", metavar="NAME",
      help=f"served model name and model spec for capacity: {', '.join(MODELS)} (default {DEFAULT_MODEL}; "
      "another name needs --num-gpu-blocks); further names are aliases it also answers to, as vLLM's "
      "--served-model-name A B")
    a("--gpu", choices=sorted(GPUS), help=f"GPU spec for capacity: {', '.join(sorted(GPUS))} (default {DEFAULT_GPU})")
    a("--gpu-memory-utilization", type=float, help="fraction of GPU memory vLLM may use (default 0.9)")
    a("--profile", choices=sorted(PROFILES), help=f"latency profile: {', '.join(sorted(PROFILES))} (default {DEFAULT_PROFILE})")
    a("--engine", choices=ENGINES, help="batched = continuous batching; simple = independent per request (default batched)")
    a("--time-scale", type=float, help="wall seconds per emulated second (default 1.0; 0.1 = 10x faster)")
    a("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int,
      help="KV blocks incl. vLLM's null block, like vLLM's --num-gpu-blocks-override (default: derived, 924)")
    a("--block-size", type=int, help="tokens per KV block (default 16)")
    a("--max-num-seqs", type=int, help="max running requests per step (default 256)")
    a("--max-num-batched-tokens", type=int,
      help="token budget of one engine step; longer prompts are prefilled in chunks (default 2048; 8192 for h100-80gb)")
    a("--max-model-len", type=int, help="max prompt + output tokens (default 4096)")
    a("--seed", type=int, help="seed of the dummy token generator (default 0)")
    a("--eos-probability", type=float, help="chance per token of a natural EOS after min_tokens (default 0)")
    a("--natural-length", help="output length of a request that sets no max_tokens, ended by EOS as a model ends "
      f"its answer: {FORMS} (default {DEFAULT_NATURAL_LENGTH}: realistic chat answers; ignore_eos and min_tokens "
      "honoured as vLLM does)")
    a("--prefix-caching-hash-algo", choices=HASH_ALGOS, help=f"block hash algorithm: {', '.join(HASH_ALGOS)} (default sha256)")
    a("--enable-prompt-tokens-details", dest="enable_prompt_tokens_details", action="store_const", const=True,
      help="fill usage.prompt_tokens_details.cached_tokens (default on)")
    a("--no-enable-prompt-tokens-details", dest="enable_prompt_tokens_details", action="store_const", const=False,
      help="leave prompt_tokens_details null, like vLLM's default")
    a("--log-format", choices=LOG_FORMATS, help="console or json: one JSON object per line (default console)")
    a("--log-requests", dest="log_requests", action="store_const", const=True, help="one log line per finished request (default on)")
    a("--no-log-requests", dest="log_requests", action="store_const", const=False, help="no per-request log line (default: one line per request)")
    a("--version", dest="version", help="version string /version reports (default 0.33.0)")
    a("--kv-events-config", type=json_object,
      help="vLLM-style KV events JSON, e.g. '{\"enable_kv_cache_events\":true}' (default: none, no events)")
    a("--enable-lora", dest="enable_lora", action="store_const", const=True,
      help="serve LoRA adapters (implied by --lora-modules; default off)")
    a("--lora-modules", nargs="+", action="extend", metavar="NAME=PATH",
      help="LoRA adapters served beside the base model, as vLLM's --lora-modules (default: none)")
    a("--max-loras", type=int, help="distinct adapters that may run in one step (default 1)")
    a("--lora-load-s", type=float, help="emulated seconds a step pays to load an adapter into a slot (default 0)")
    f = p.add_argument_group("fault injection (off by default; rates are probabilities per request, seeded by --seed)")
    f.add_argument("--fault-error-rate", type=float, help="answer this share of requests with a 5xx before any byte (default 0)")
    f.add_argument("--fault-error-status", type=int, help="status of injected errors (default 503)")
    f.add_argument("--fault-latency-spike-rate", type=float, help="share of requests delayed before the first byte (default 0)")
    f.add_argument("--fault-latency-spike", type=float, help="that extra delay, wall seconds (default 0)")
    f.add_argument("--fault-hang-rate", type=float, help="share of requests that hang before the first byte until the client leaves (default 0)")
    f.add_argument("--fault-cut-after", type=int, help="cut (abort the connection, no [DONE]) after N tokens (default: never)")
    f.add_argument("--fault-cut-rate", type=float, help="share of requests --fault-cut-after applies to (default 1)")
    f.add_argument("--fault-crash-after", type=int, help="exit the process (in-process: drop every connection) at request N+1 (default: never)")
    f.add_argument("--fault-slow-start", type=float, help="/health answers 503 for the first S wall seconds (default 0)")
    return p

