"""KV-cache capacity derived from a model spec and a GPU spec, the way vLLM sizes its block pool.

bytes per token  = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
                 = 2 x 40 x 40 x 128 x 2 = 819,200 B (800 KiB) for Llama-2-13B in FP16
bytes per block  = 16 tokens x 819,200 = 13,107,200 B
KV budget        = GPU memory x utilisation - weights - activation peak
                 = 40 GiB x 0.9 - 13.0e9 x 2 B - 512 MiB = 12,117,834,752 B
blocks           = floor(12,117,834,752 / 13,107,200) = 924  (14,784 tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts that size a model's KV cache and weights."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    params_billion: float
    dtype_bytes: int = 2
    max_model_len: int = 4096

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return int(round(self.params_billion * 1e9)) * self.dtype_bytes

    def block_bytes(self, block_size: int) -> int:
        return self.kv_bytes_per_token * block_size


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's memory and what vLLM keeps back from it besides weights (profiled activation peak)."""

    name: str
    memory_bytes: int
    activation_bytes: int = 512 * MIB


MODELS: dict[str, ModelSpec] = {
    "meta-llama/Llama-2-13b-hf": ModelSpec("meta-llama/Llama-2-13b-hf", 40, 40, 128, 13.0),
    "meta-llama/Llama-2-7b-hf": ModelSpec("meta-llama/Llama-2-7b-hf", 32, 32, 128, 6.74),
}
GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec("a100-40gb", 40 * GIB),
    "a100-80gb": GpuSpec("a100-80gb", 80 * GIB),
    "h100-80gb": GpuSpec("h100-80gb", 80 * GIB),
}
DEFAULT_MODEL = "meta-llama/Llama-2-13b-hf"
DEFAULT_GPU = "a100-40gb"


def kv_budget_bytes(model: ModelSpec, gpu: GpuSpec, gpu_memory_utilization: float = 0.9) -> int:
    """Bytes left for KV blocks after weights and the activation peak, as vLLM's profiler finds."""
    return int(gpu.memory_bytes * gpu_memory_utilization) - model.weight_bytes - gpu.activation_bytes


def num_gpu_blocks(
    model: ModelSpec, gpu: GpuSpec, block_size: int = 16, gpu_memory_utilization: float = 0.9
) -> int:
    """How many `block_size`-token KV blocks fit: 924 for Llama-2-13B FP16 on an A100 40GB at 0.9."""
    return max(0, kv_budget_bytes(model, gpu, gpu_memory_utilization) // model.block_bytes(block_size))
