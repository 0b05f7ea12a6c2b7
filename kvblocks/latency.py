"""Latency profiles and the step-time formula of the batched engine.

Isolated request: TTFT = prefill_base + uncached_blocks x prefill_per_block (+ the context term
below when part of the prompt was cached); each further token takes decode_per_token. A batched
engine step that carries P prefill blocks (chunks of any number of requests), C block pairs of
chunk-attends-to-earlier-context, and D decoding sequences takes

    step = [P > 0] x prefill_base + P x prefill_per_block + C x ctx_per_block_pair
           + [D > 0] x decode_per_token x (1 + batch_coef x (D - 1))

C = sum over chunks of (chunk blocks x blocks computed before the chunk: a cached prefix or earlier
chunks). prefill_per_block was fit on whole prompts, so it already holds a prompt's attention to
itself; a chunk after cached context also attends to that context, which whole-prompt fits never
charged. A lone uncached prompt within one step's token budget sees exactly the isolated figures,
and load (more prefill, a bigger batch) slows every request in the step, as on a real GPU (see
../shared/reference/calibration.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyProfile:
    """Seconds of emulated GPU time; `batch_coef` is the decode slowdown per extra sequence,
    `ctx_per_block_pair` the attention cost of one new block against one earlier context block."""

    name: str
    prefill_base: float
    prefill_per_block: float
    decode_per_token: float
    batch_coef: float = 0.04
    ctx_per_block_pair: float = 0.0

    def prefill_time(self, blocks: int, context_block_pairs: int = 0) -> float:
        """One step's prefill part: `blocks` new blocks, `context_block_pairs` against earlier context."""
        return self.prefill_base + blocks * self.prefill_per_block + context_block_pairs * self.ctx_per_block_pair

    def isolated_ttft(self, uncached_blocks: int, cached_blocks: int = 0) -> float:
        """TTFT of a lone prompt prefilled in one step (within the token budget)."""
        return self.prefill_time(uncached_blocks, uncached_blocks * cached_blocks)

    def decode_step(self, batch: int) -> float:
        if batch <= 0:
            return 0.0
        return self.decode_per_token * (1.0 + self.batch_coef * (batch - 1))

    def step_time(self, prefill_blocks: int, has_prefill: bool, decode_batch: int, context_block_pairs: int = 0) -> float:
        """Emulated duration of one engine step (formula in the module docstring)."""
        t = self.decode_step(decode_batch)
        if has_prefill:
            t += self.prefill_time(prefill_blocks, context_block_pairs)
        return t

    def isolated_latency(self, uncached_blocks: int, output_tokens: int) -> float:
        return self.isolated_ttft(uncached_blocks) + max(0, output_tokens - 1) * self.decode_per_token


# A100 40GB figures are scaled from the H100 measurement (calibration.md); batch_coef from the
# H100 decode steps at batch 1 and 64 (30 -> 106 ms: (106/30 - 1) / 63 = 0.040). ctx_per_block_pair
# from the H100 full-prefill curvature: 4096 tokens take 8.3 ms more than twice 2048, for
# (4096^2 - 2 x 2048^2) / 2 = 4.19M extra token pairs -> 2.0e-9 s a token pair = 5.1e-7 s a block
# pair (256 token pairs); x 2.56 for the A100 (its prefill_per_block ratio) = 1.3e-6 s.
PROFILES: dict[str, LatencyProfile] = {
    "a100-40gb-llama2-13b": LatencyProfile("a100-40gb-llama2-13b", 0.020, 0.0023, 0.018, 0.04, 1.3e-6),
    "h100-80gb-llama2-13b-eager": LatencyProfile("h100-80gb-llama2-13b-eager", 0.022, 0.0009, 0.030, 0.04, 5.1e-7),
    "zero": LatencyProfile("zero", 0.0, 0.0, 0.0, 0.0),
}
DEFAULT_PROFILE = "a100-40gb-llama2-13b"


def get_profile(name: str) -> LatencyProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; choose one of {', '.join(PROFILES)}") from None
