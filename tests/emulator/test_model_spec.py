"""KV-cache capacity from model and GPU specs: the arithmetic in emulator/model_spec.py's docstring, the
tensor-parallel GPU spec, and the anchors' profiles offered on the command lines."""
from __future__ import annotations

import pytest

from emulator.config import EmulatorConfig
from emulator.model_spec import GPUS, MODELS, GpuSpec, kv_budget_bytes, num_gpu_blocks
from kvblocks.latency import PROFILES

GIB = 1024**3
QWEN, TP2 = MODELS["Qwen/Qwen3-32B"], GPUS["2xh100-80gb"]


def test_llama2_13b_on_a100_40gb_keeps_its_924_blocks():
    m, g = MODELS["meta-llama/Llama-2-13b-hf"], GPUS["a100-40gb"]
    assert m.kv_bytes_per_token == 819_200 and kv_budget_bytes(m, g) == 12_117_834_752
    assert num_gpu_blocks(m, g) == 924


def test_qwen3_32b_on_two_h100s_sizes_as_the_docstring_says():
    assert QWEN.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2 == 262_144
    assert QWEN.weight_bytes == 65_600_000_000 and QWEN.block_bytes(16) == 4_194_304
    # two GPUs: each keeps 0.9 x 80 GiB minus its 4 GiB reserve, and the pair holds the weights once
    assert kv_budget_bytes(QWEN, TP2) == 2 * (int(80 * GIB * 0.9) - 4 * GIB) - 65_600_000_000 == 80_428_888_064
    blocks = num_gpu_blocks(QWEN, TP2)
    assert blocks == 19_175 and blocks * 16 == 306_800
    assert abs(blocks * 16 - 307_328) / 307_328 < 0.002  # llm-d's logged cache per instance
    # llm-d's b2b-saas demand: 150 customers x (6,000 context + 5 x 1,200 questions) on 8 instances = 73%
    assert 150 * (6000 + 5 * 1200) / (8 * blocks * 16) == pytest.approx(0.733, abs=0.001)
    # one H100 keeps only 7.3 GB after the weights: the second GPU gives 7x the cache, not 2x
    assert num_gpu_blocks(QWEN, GPUS["h100-80gb"]) == 2663


def test_gpu_count_multiplies_memory_not_weights():
    one = GpuSpec("x", 80 * GIB, activation_bytes=GIB)
    two = GpuSpec("x2", 80 * GIB, activation_bytes=GIB, count=2)
    assert kv_budget_bytes(QWEN, two) - kv_budget_bytes(QWEN, one) == int(80 * GIB * 0.9) - GIB
    with pytest.raises(ValueError, match="count"):
        GpuSpec("none", 80 * GIB, count=0)


def test_emulator_config_resolves_the_anchor_setup():
    c = EmulatorConfig(model="Qwen/Qwen3-32B", gpu="2xh100-80gb", profile="2xh100-80gb-qwen3-32b", max_model_len=8448)
    assert c.resolved_num_gpu_blocks == 19_175 and c.resolved_max_num_batched_tokens == 8192


def test_qwen3_profile_estimates():
    p = PROFILES["2xh100-80gb-qwen3-32b"]
    # a 7,200-token miss (450 blocks) in one step ~0.57 s; one decode token 10 ms; prefill per block is the
    # H100 Llama-2-13B figure x 2.46 (FLOPs per token) / 2 (GPUs) / 0.9 (TP efficiency)
    assert p.isolated_ttft(450) == pytest.approx(0.5735)
    assert p.prefill_per_block == pytest.approx(PROFILES["h100-80gb-llama2-13b-eager"].prefill_per_block * 2.46 / 2 / 0.9,
                                                rel=0.01)
    assert p.decode_step(1) == 0.010


def test_cli_offers_the_anchor_profiles():
    from loadgen.__main__ import build_parser

    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]
    opts = {a.dest: a for a in sim._actions}
    assert "2xh100-80gb" in opts["gpu"].choices and "2xh100-80gb-qwen3-32b" in opts["profile"].choices
    from emulator.config import build_parser as emu_parser

    emu = {a.dest: a for a in emu_parser()._actions}
    for dest, name in (("gpu", "2xh100-80gb"), ("profile", "2xh100-80gb-qwen3-32b")):
        assert name in emu[dest].choices
    c = EmulatorConfig.from_cli(["--model", "Qwen/Qwen3-32B", "--gpu", "2xh100-80gb", "--profile",
                                 "2xh100-80gb-qwen3-32b", "--max-model-len", "8448"], env={})
    assert c.resolved_num_gpu_blocks == 19_175
