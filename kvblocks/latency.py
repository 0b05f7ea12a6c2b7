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
#
# 2xh100-80gb-qwen3-32b (Qwen3-32B BF16, tensor parallel 2 over two H100s, vLLM with CUDA graphs): ESTIMATED
# from the H100 Llama-2-13B measurement, not measured. Prefill scales with FLOPs per token (2 x non-embedding
# parameters: 2 x 31.2B for Qwen3-32B against 2 x 12.7B for Llama-2-13B = 2.46x), halved by the second GPU
# and divided by ~0.9 TP efficiency (two all-reduces per layer): 0.0009 x 2.46 / 2 / 0.9 = 0.00123 s a block
# (77 us a token; a 7,200-token miss ~0.57 s, near llm-d's 0.62 s mean TTFT for random routing at 3 QPS).
# Decode is weight-read bound: 32.8 GB per GPU / 3.35 TB/s = 9.8 ms, plus ~1 ms of all-reduce and launch
# latency at small batch = 0.010 s (llm-d's ITL mean at 3 QPS: 0.011 s, with a few sequences per pod);
# batch_coef 0.03: each ~7.5k-token sequence adds its KV reads, 7,500 x 128 KiB per GPU / 3.35 TB/s = 0.29 ms
# a step, 0.03 of the 10 ms (llm-d's ITL mean grows 0.011 -> 0.029 s from 3 to 60 QPS). prefill_base 0.020 (scheduler, launch and
# TP sync; the eager HF floor was 22 ms). ctx_per_block_pair scales with attention FLOPs per token pair
# (layers x query heads x head_dim: 64 x 64 x 128 against 40 x 40 x 128 = 2.56x), halved by TP:
# 5.1e-7 x 1.28 = 6.5e-7 s.
PROFILES: dict[str, LatencyProfile] = {
    "a100-40gb-llama2-13b": LatencyProfile("a100-40gb-llama2-13b", 0.020, 0.0023, 0.018, 0.04, 1.3e-6),
    "h100-80gb-llama2-13b-eager": LatencyProfile("h100-80gb-llama2-13b-eager", 0.022, 0.0009, 0.030, 0.04, 5.1e-7),
    "2xh100-80gb-qwen3-32b": LatencyProfile("2xh100-80gb-qwen3-32b", 0.020, 0.00123, 0.010, 0.03, 6.5e-7),
    "zero": LatencyProfile("zero", 0.0, 0.0, 0.0, 0.0),
}
DEFAULT_PROFILE = "a100-40gb-llama2-13b"


def get_profile(name: str) -> LatencyProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; choose one of {', '.join(PROFILES)}") from None
