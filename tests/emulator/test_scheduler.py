"""vLLM v1 scheduler semantics of the batched engine: the per-step token budget, chunked prefill
(a KV BlockStored per chunk), decode-first budgeting, admission without an output-token slot,
prompt_logprobs skipping the prefix cache, cache_salt in hashes and events, and the start-up check.

Each test fails on the engine that prefilled whole prompts in one step and reserved a lookahead slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest

from emulator.config import EmulatorConfig
from emulator.engine import BatchedEngine, SchedulerStep
from kvblocks.latency import get_profile
from emulator.metrics import EngineMetrics
from emulator.request import SamplingParams
from kvblocks import BlockHasher
from kvblocks.hashing import salt_extra_keys, hash_block, hash_to_int, none_hash
from kvblocks.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from kvblocks.kv_events import _event_to_map as encode_event

PROFILE = get_profile("a100-40gb-llama2-13b")


class RecordingEngine(BatchedEngine):
    """The batched engine, keeping each step's schedule so tests can read what vLLM would batch."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.steps: list[SchedulerStep] = []
        self.batches: list[list] = []
        self.set_kv_event_sink(self.batches.append)

    def schedule(self) -> SchedulerStep:
        step = super().schedule()
        if not step.empty:
            self.steps.append(step)
        return step


def engine(**kw) -> RecordingEngine:
    kw.setdefault("max_num_seqs", 8)
    if "num_gpu_blocks" in kw:
        kw.setdefault("max_model_len", (kw["num_gpu_blocks"] - 1) * kw.get("block_size", 16))
    cfg = EmulatorConfig(port=0, time_scale=kw.pop("time_scale", 0.01), log_requests=False, **kw)
    metrics = EngineMetrics(cfg)
    eng = RecordingEngine(cfg, metrics=metrics)
    metrics.bind(eng)
    return eng


async def run(eng, req):
    async with contextlib.aclosing(eng.generate(req)) as gen:
        return [o async for o in gen]


def prompt(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def stored(batches) -> list[BlockStored]:
    return [e for b in batches for e in b if isinstance(e, BlockStored)]


def test_token_budget_defaults_follow_vllm_per_gpu():
    assert EmulatorConfig().resolved_max_num_batched_tokens == 2048  # A100-40GB, the default
    assert EmulatorConfig(gpu="a100-80gb").resolved_max_num_batched_tokens == 2048  # vLLM excludes A100s
    assert EmulatorConfig(gpu="h100-80gb").resolved_max_num_batched_tokens == 8192
    assert EmulatorConfig(max_num_batched_tokens=512).resolved_max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="max_num_seqs"):
        EmulatorConfig(max_num_batched_tokens=100, max_num_seqs=256)
    EmulatorConfig(engine="simple", max_num_seqs=100000)  # no step budget in the per-request model


async def test_long_prompt_is_prefilled_in_chunks_with_a_block_stored_per_chunk():
    eng = engine(max_num_batched_tokens=64)
    req = eng.make_request("r", prompt(150), SamplingParams(max_tokens=2))
    outs = await run(eng, req)
    assert [[c.num_tokens for c in s.prefills] for s in eng.steps[:3]] == [[64], [64], [22]]
    assert [o.num_output_tokens for o in outs] == [1, 2]  # no token until the prompt is computed
    events = stored(eng.batches)
    assert [len(e.block_hashes) for e in events] == [4, 4, 1]  # blocks full after each chunk: 4, 8, 9
    assert events[0].parent_block_hash is None
    assert events[1].parent_block_hash == events[0].block_hashes[-1]
    assert events[2].parent_block_hash == events[1].block_hashes[-1]
    assert [len(b) for b in eng.batches[:3]] == [1, 1, 1], "one batch per step"
    # TTFT charges every chunk: its blocks, the step's base, and its attention to earlier chunks.
    expected = PROFILE.prefill_time(4) + PROFILE.prefill_time(4, 4 * 4) + PROFILE.prefill_time(2, 2 * 8)
    assert req.timings.ttft == pytest.approx(expected, abs=1e-9)
    assert req.timings.ttft > PROFILE.isolated_ttft(10)


async def test_running_decodes_take_the_budget_first():
    eng = engine(max_num_batched_tokens=64)
    a = eng.make_request("a", prompt(20), SamplingParams(max_tokens=30))
    ta = asyncio.create_task(run(eng, a))
    while a.timings.first_token is None:
        await asyncio.sleep(0.001)
    b = eng.make_request("b", prompt(200, 5000), SamplingParams(max_tokens=1))
    await asyncio.gather(ta, run(eng, b))
    chunks = [(s, c.num_tokens) for s in eng.steps for c in s.prefills if c.req is b]
    assert chunks[0][1] == 63 and all(a in s.decodes for s, _ in chunks[:-1]), "a decodes in every step of b's prefill"
    assert sum(n for _, n in chunks) == 200
    assert all(s.num_tokens <= 64 for s in eng.steps)


async def test_requests_finishing_in_one_step_free_their_blocks_in_scheduling_order():
    """vLLM's update_from_output walks the step's requests in scheduling order, so a decode that ends
    frees its blocks before a prefill scheduled after it in the same step: that sets eviction order."""
    eng = engine(max_num_batched_tokens=32)
    a_toks, b_toks = prompt(20), prompt(60, 5000)
    a = eng.make_request("a", a_toks, SamplingParams(max_tokens=3, ignore_eos=True))
    b = eng.make_request("b", b_toks, SamplingParams(max_tokens=1))
    await asyncio.gather(run(eng, a), run(eng, b))
    assert a.timings.finished == b.timings.finished  # both ended in one step: a decoding, b's last chunk
    pool = eng.block_pool
    hasher = BlockHasher(16)
    a0 = pool.get_cached_block(hasher.hashes(a_toks)[0]).block_id
    b_ids = [pool.get_cached_block(h).block_id for h in hasher.hashes(b_toks)]
    assert pool.free_block_queue.block_ids()[-4:] == [a0, *reversed(b_ids)]


async def test_admission_reserves_no_slot_for_the_first_output_token():
    eng = engine(num_gpu_blocks=6)  # 5 usable blocks
    b = eng.make_request("b", prompt(10), SamplingParams(max_tokens=5))  # 1 block
    a = eng.make_request("a", prompt(64, 7000), SamplingParams(max_tokens=1))  # exactly the 4 free blocks
    await asyncio.gather(run(eng, b), run(eng, a))
    assert a.timings.first_scheduled == b.timings.first_scheduled, "vLLM admits a prompt that exactly fills the cache"
    assert eng.steps[0].prefills and {c.req for c in eng.steps[0].prefills} == {a, b}
    eng.block_pool.check_invariants()


async def test_admission_needs_the_whole_prompt_to_fit_not_just_its_first_chunk():
    eng = engine(num_gpu_blocks=9, max_num_batched_tokens=32)  # 8 usable blocks, 2-block chunks
    a = eng.make_request("a", prompt(40), SamplingParams(max_tokens=3))  # 3 blocks
    b = eng.make_request("b", prompt(100, 5000), SamplingParams(max_tokens=1))  # 7 blocks: waits for a
    await asyncio.gather(run(eng, a), run(eng, b))
    assert b.timings.first_scheduled >= a.timings.finished - 1e-9
    eng.block_pool.check_invariants()


async def test_preempted_request_recomputes_in_chunks_and_resumes_its_stream():
    eng = engine(num_gpu_blocks=6, max_num_batched_tokens=32)
    a = eng.make_request("a", prompt(30), SamplingParams(max_tokens=40))  # grows to 5 blocks
    b = eng.make_request("b", prompt(30, 5000), SamplingParams(max_tokens=12))
    ra, rb = await asyncio.gather(run(eng, a), run(eng, b))
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert ra[-1].num_output_tokens == 40 and rb[-1].num_output_tokens == 12
    assert all(s.num_tokens <= 32 for s in eng.steps)
    assert eng.block_pool.num_referenced_blocks() == 0
    eng.block_pool.check_invariants()


async def test_prompt_logprobs_skip_the_prefix_cache_and_its_metrics():
    eng = engine()
    await run(eng, eng.make_request("a", prompt(40), SamplingParams(max_tokens=1)))
    q, h = eng.kv_cache_manager.stats.queries, eng.kv_cache_manager.stats.hits
    n_events = len(stored(eng.batches))
    b = eng.make_request("b", prompt(40), SamplingParams(max_tokens=1, prompt_logprobs=0))
    outs = await run(eng, b)
    assert outs[0].num_cached_tokens == 0
    again = stored(eng.batches)[n_events:]
    assert [len(e.block_hashes) for e in again] == [2], "vLLM computes and stores the blocks again"
    assert again[0].block_hashes == stored(eng.batches)[0].block_hashes
    assert (eng.kv_cache_manager.stats.queries, eng.kv_cache_manager.stats.hits) == (q, h)
    assert eng.metrics.prefix_queries._value.get() == q
    c = eng.make_request("c", prompt(40), SamplingParams(max_tokens=1))
    assert (await run(eng, c))[0].num_cached_tokens == 32  # a normal request still hits
    eng.block_pool.check_invariants()


async def test_cache_salt_hashes_block_zero_tagged_and_events_carry_vllms_extra_keys():
    eng = engine()
    toks = prompt(40)
    req = eng.make_request("r", toks, SamplingParams(max_tokens=10, ignore_eos=True), cache_salt="tenant-a")
    await run(eng, req)
    events = stored(eng.batches)
    b0 = hash_block(none_hash(), toks[:16], (("cache_salt", "tenant-a"),))
    assert events[0].block_hashes[0] == hash_to_int(b0)
    assert events[0].extra_keys == [("tenant-a",), None]  # untagged, one entry per block
    assert encode_event(events[1])["extra_keys"] == [None]  # block 2, filled while decoding
    plain = engine()
    await run(plain, plain.make_request("p", toks, SamplingParams(max_tokens=1)))
    assert encode_event(stored(plain.batches)[0])["extra_keys"] == [None, None]
    assert salt_extra_keys(None) is None and salt_extra_keys("") is None


async def test_reset_prefix_cache_is_published_with_the_next_step():
    eng = engine()
    await run(eng, eng.make_request("a", prompt(40), SamplingParams(max_tokens=1)))
    n = len(eng.batches)
    assert eng.reset_prefix_cache()
    assert len(eng.batches) == n
    await run(eng, eng.make_request("b", prompt(40), SamplingParams(max_tokens=1)))
    assert [type(e) for e in eng.batches[n]] == [AllBlocksCleared, BlockStored]
    assert not any(isinstance(e, BlockRemoved) for e in eng.batches[n])


async def test_a_reset_during_a_step_opens_the_next_steps_batch():
    eng = engine()
    req = eng.make_request("a", prompt(40), SamplingParams(max_tokens=30, ignore_eos=True))
    task = asyncio.create_task(run(eng, req))
    while not eng._in_step:  # the prefill step, whose BlockStored is already queued, is running
        await asyncio.sleep(0)
    assert len(eng.steps) == 1 and eng.block_pool._events
    assert eng.reset_prefix_cache(reset_running_requests=True)  # preempts a, which recomputes
    outs = await task
    assert outs[-1].num_output_tokens == 30 and req.num_preemptions == 1
    cleared = [i for i, b in enumerate(eng.batches) for e in b if isinstance(e, AllBlocksCleared)]
    assert len(cleared) == 1
    assert [type(e) for e in eng.batches[0]] == [BlockStored], "the running step's batch ends before the reset"
    assert isinstance(eng.batches[cleared[0]][0], AllBlocksCleared), "never appended to a running step's batch"
    assert not any(isinstance(e, BlockRemoved) for b in eng.batches for e in b)


def test_max_model_len_must_fit_the_kv_cache():
    with pytest.raises(ValueError, match="max_model_len 4096 does not fit the KV cache"):
        EmulatorConfig(num_gpu_blocks=128, block_size=32)  # 127 usable x 32 = 4064 tokens
    EmulatorConfig(num_gpu_blocks=128, block_size=32, max_model_len=2048)  # as real vLLM on CPU starts


def test_cli_refuses_to_start_when_max_model_len_does_not_fit():
    out = subprocess.run([sys.executable, "-m", "emulator", "--port", "0", "--num-gpu-blocks-override", "128",
                          "--block-size", "32"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--max-model-len: 4096 does not fit the KV cache" in out.stderr and len(out.stderr.splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_python_hash_seed_empty_string_is_a_seed(monkeypatch):
    import hashlib
    import pickle

    monkeypatch.setenv("PYTHONHASHSEED", "")
    assert none_hash() == hashlib.sha256(pickle.dumps("", protocol=5)).digest()
    assert BlockHasher(16).root == none_hash()
    monkeypatch.delenv("PYTHONHASHSEED")
    assert none_hash() == hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=5)).digest()
