"""Run by the vLLM venv's python: drive vLLM 0.32's own Scheduler through scenarios, print its trace.

stdin: {"model_dir", "scenarios": [{"config": {...}, "ops": [op, ...]}, ...]} (see
test_scheduler_vs_vllm.py); stdout: one trace per
scenario: per step the tokens scheduled per request, the KV-event batches, and each request's
cached tokens. No model runs: the "model" samples the token scheduler_diff.sampled_token gives.
Imports only vLLM (and the tiny model's config.json for ModelConfig).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402

from vllm.config import CacheConfig, KVEventsConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402


def sampled_token(rid: str, position: int) -> int:
    """Must equal test_scheduler_vs_vllm.sampled_token."""
    return 1000 + (sum(map(ord, rid)) * 7919 + position * 31) % 50000


def event(ev) -> list:
    if isinstance(ev, BlockStored):
        return ["stored", list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                [list(k) if k is not None else None for k in ev.extra_keys] if ev.extra_keys else None]
    if isinstance(ev, BlockRemoved):
        return ["removed", list(ev.block_hashes)]
    if isinstance(ev, AllBlocksCleared):
        return ["cleared"]
    return ["other", type(ev).__name__]


def make_scheduler(cfg: dict, model_dir: str) -> tuple[Scheduler, list]:
    bs, blocks = cfg["block_size"], cfg["num_gpu_blocks"]
    mc = ModelConfig(model=model_dir, max_model_len=cfg["max_model_len"], skip_tokenizer_init=True, dtype="float32")
    sc = SchedulerConfig(max_num_batched_tokens=cfg["max_num_batched_tokens"], max_num_seqs=cfg["max_num_seqs"],
                         max_model_len=cfg["max_model_len"], is_encoder_decoder=False)
    cc = CacheConfig(block_size=bs, enable_prefix_caching=True, prefix_caching_hash_algo=cfg["hash_algo"])
    cc.num_gpu_blocks = blocks
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                    kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"))
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer0"], spec)])
    s = Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                  block_size=bs, log_stats=True)
    batches: list = []
    s.kv_event_publisher.publish = lambda batch: batches.append([event(e) for e in batch.events])
    return s, batches


def run(s: Scheduler, batches: list, ops: list, cfg: dict) -> dict:
    hasher = get_request_block_hasher(cfg["block_size"], get_hash_fn_by_name(cfg["hash_algo"]))
    steps: list[dict] = []
    free: list[list[int]] = []
    cached: dict[str, int] = {}
    step_batches: list = []

    def step() -> bool:
        so = s.schedule()
        n0 = len(batches)
        if so.total_num_scheduled_tokens == 0:
            s.update_from_output(so, ModelRunnerOutput(req_ids=[], req_id_to_index={}))
            step_batches.extend(batches[n0:])
            return False
        ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            r = s.requests[rid]
            sampled.append([sampled_token(rid, r.num_tokens)] if r.num_computed_tokens >= r.num_tokens else [])
        outs = s.update_from_output(so, ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                                          sampled_token_ids=sampled))
        for eco in outs.values():
            for o in eco.outputs:
                if o.prefill_stats is not None and o.request_id not in cached:
                    cached[o.request_id] = o.prefill_stats.num_cached_tokens
        steps.append(dict(so.num_scheduled_tokens))
        if os.environ.get("KVROUTE_DUMP_FREE_QUEUE"):  # debugging a mismatch: the eviction order per step
            free.append([b.block_id for b in s.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()])
        step_batches.extend(batches[n0:])
        return True

    for op in ops:
        kind = op[0]
        if kind == "add":
            _, rid, prompt, max_tokens, salt, plp = op
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=plp)
            s.add_request(Request(rid, list(prompt), sp, None, cache_salt=salt, block_hasher=hasher))
        elif kind == "step":
            for _ in range(op[1]):
                step()
        elif kind == "drain":
            while s.has_requests():
                if not step():
                    break
        elif kind == "reset":
            s.reset_prefix_cache()
    return {"steps": steps, "batches": step_batches, "cached": cached, "free": free}


def main() -> int:
    data = json.load(sys.stdin)
    traces = []
    for sc in data["scenarios"]:
        cfg = sc["config"]
        init_none_hash(get_hash_fn_by_name(cfg["hash_algo"]))
        s, batches = make_scheduler(cfg, data["model_dir"])
        traces.append(run(s, batches, sc["ops"], cfg))
    json.dump(traces, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
