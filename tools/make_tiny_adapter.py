"""Build a tiny LoRA adapter for the tiny Llama (tools/make_tiny_model.py), offline, without peft.

Run with the vLLM venv's Python: `python tools/make_tiny_adapter.py OUT_DIR SEED`. An adapter is what
peft's `save_pretrained` writes and vLLM's loader reads: `adapter_config.json` (peft LoRA fields)
and `adapter_model.safetensors` with `base_model.model.<module>.lora_A/lora_B.weight` tensors, here
rank 8 on q_proj and v_proj of both layers, random (seeded) so two adapters really differ. Writing
the two files directly needs only torch and safetensors, which vLLM already pulls in; installing peft
would change the shared venv's recipe and rebuild it for everyone.
"""
from __future__ import annotations

import json
import os
import sys

HIDDEN, LAYERS, RANK = 128, 2, 8  # the tiny model's hidden size (q and v project 128 -> 128) and layers


def main(out: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.01
            tensors[f"{name}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=g) * 0.01
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": None, "inference_mode": True,
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
