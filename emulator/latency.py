"""Latency profiles and the step-time formula of the batched engine.

Isolated request: TTFT = prefill_base + uncached_blocks x prefill_per_block; each further token
takes decode_per_token. A batched engine step that carries P prefill blocks (from any number of
requests) and D decoding sequences takes

    step = [P > 0] x prefill_base + P x prefill_per_block + [D > 0] x decode_per_token x (1 + batch_coef x (D - 1))

so a lone request sees exactly the isolated figures, and load (more prefill, a bigger batch) slows
every request in the step, as on a real GPU (see ../shared/reference/calibration.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyProfile:
    """Seconds of emulated GPU time; `batch_coef` is the decode slowdown per extra sequence."""

    name: str
    prefill_base: float
    prefill_per_block: float
    decode_per_token: float
    batch_coef: float = 0.04

    def isolated_ttft(self, uncached_blocks: int) -> float:
        return self.prefill_base + uncached_blocks * self.prefill_per_block

    def decode_step(self, batch: int) -> float:
        if batch <= 0:
            return 0.0
        return self.decode_per_token * (1.0 + self.batch_coef * (batch - 1))

    def step_time(self, prefill_blocks: int, has_prefill: bool, decode_batch: int) -> float:
        """Emulated duration of one engine step (formula in the module docstring)."""
        t = self.decode_step(decode_batch)
        if has_prefill:
            t += self.prefill_base + prefill_blocks * self.prefill_per_block
        return t

    def isolated_latency(self, uncached_blocks: int, output_tokens: int) -> float:
        return self.isolated_ttft(uncached_blocks) + max(0, output_tokens - 1) * self.decode_per_token


# A100 40GB figures are scaled from the H100 measurement (calibration.md); batch_coef from the
# H100 decode steps at batch 1 and 64 (30 -> 106 ms: (106/30 - 1) / 63 = 0.040).
PROFILES: dict[str, LatencyProfile] = {
    "a100-40gb-llama2-13b": LatencyProfile("a100-40gb-llama2-13b", 0.020, 0.0023, 0.018, 0.04),
    "h100-80gb-llama2-13b-eager": LatencyProfile("h100-80gb-llama2-13b-eager", 0.022, 0.0009, 0.030, 0.04),
    "zero": LatencyProfile("zero", 0.0, 0.0, 0.0, 0.0),
}
DEFAULT_PROFILE = "a100-40gb-llama2-13b"


def get_profile(name: str) -> LatencyProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; choose one of {', '.join(PROFILES)}") from None
