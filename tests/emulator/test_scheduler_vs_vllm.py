"""The batched engine's scheduler against vLLM 0.32's own Scheduler, in process, step for step.

Seeded random scenarios (shared roots, branches, exact repeats, block-aligned and ragged lengths,
prompts longer than the step budget, salted prompts, prompt_logprobs, resets, overlapping and
sequential requests, a cache small enough to evict and preempt) run through vLLM's Scheduler (in the
vLLM venv, tests/emulator/vllm_scheduler_driver.py) and through the emulator's BatchedEngine with the
same sampled tokens. Per step the tokens scheduled per request, every KV-event batch (hashes,
parents, token ids, extra keys, removals, clears) and each request's cached tokens must be equal.
The vLLM venv and the tiny model (for ModelConfig) come from tests/conftest.py's `vllm_toolchain`, built
on first use whatever ran before: on a fresh machine this test runs, it does not skip.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from emulator.config import EmulatorConfig
from emulator.engine import BatchedEngine
from emulator.request import SamplingParams
from kvblocks.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from ..progress import say

DRIVER = Path(__file__).with_name("vllm_scheduler_driver.py")
CONFIG = {"block_size": 16, "num_gpu_blocks": 48, "max_num_batched_tokens": 64, "max_num_seqs": 8,
          "max_model_len": 512, "hash_algo": "sha256"}
# Odd scenarios: a cache barely above max_model_len (prompts fill it exactly, decodes preempt), a
# larger budget, block size 32 as vLLM needs on CPU, and the CBOR hash.
TIGHT = {"block_size": 32, "num_gpu_blocks": 18, "max_num_batched_tokens": 128, "max_num_seqs": 6,
         "max_model_len": 512, "hash_algo": "sha256_cbor"}
SCENARIOS = 10
REQUESTS = 200


def sampled_token(rid: str, position: int) -> int:
    """The dummy model's token at `position` of request `rid` (vllm_scheduler_driver.sampled_token)."""
    return 1000 + (sum(map(ord, rid)) * 7919 + position * 31) % 50000


def scenario(seed: int, n: int = REQUESTS) -> list[list]:
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    ops: list[list] = []
    for i in range(n):
        roll = rng.random()
        if prompts and roll < 0.2:
            prompt = list(rng.choice(prompts))  # exact repeat
        elif prompts and roll < 0.55:
            base = rng.choice(prompts)  # a branch off an earlier prompt
            cut = rng.randrange(1, len(base) + 1)
            prompt = base[:cut] + [rng.randrange(1000, 90000) for _ in range(rng.randrange(1, 80))]
        else:
            length = rng.choice([16, 32, 48, 64, 128, 200, 300]) if rng.random() < 0.4 else rng.randrange(1, 300)
            prompt = [rng.randrange(1000, 90000) for _ in range(length)]
        prompt = prompt[:400]
        prompts.append(prompt)
        salt = rng.choice(["tenant-a", "tenant-b"]) if rng.random() < 0.15 else None
        plp = 0 if rng.random() < 0.1 else None
        ops.append(["add", f"r{i}", prompt, rng.randrange(1, 40), salt, plp])
        after = rng.random()
        if after < 0.4:
            ops.append(["drain"])
            if rng.random() < 0.1:
                ops.append(["reset"])
        elif after < 0.8:
            ops.append(["step", rng.randrange(1, 6)])
    ops.append(["drain"])
    return ops


class FixedTokens:
    """The dummy model both sides share: the token at each position is fixed by the request id."""

    def __init__(self, rid: str, seq) -> None:
        self.rid, self.seq = rid, seq

    def next_token(self, allow_eos: bool) -> int:
        return sampled_token(self.rid, len(self.seq.token_ids))


def wire(ev) -> list:
    if isinstance(ev, BlockStored):
        extra = ev.extra_keys if ev.extra_keys is not None else [None] * len(ev.block_hashes)
        return ["stored", list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids),
                [list(k) if k is not None else None for k in extra]]
    if isinstance(ev, BlockRemoved):
        return ["removed", list(ev.block_hashes)]
    if isinstance(ev, AllBlocksCleared):
        return ["cleared"]
    raise TypeError(ev)


def config_for(seed: int) -> dict:
    return TIGHT if seed % 2 or seed >= SCENARIOS else CONFIG


def exact_fit() -> list[list]:
    """TIGHT: while a 60-token request decodes in its 2 blocks, a 480-token prompt needs exactly the
    15 free blocks: vLLM admits it at once, reserving no block for its first output token."""
    return [["add", "a", list(range(2000, 2060)), 4, None, None], ["step", 1],
            ["add", "b", list(range(5000, 5480)), 1, None, None], ["drain"]]


def run_emulator(ops: list[list], conf: dict = CONFIG) -> dict:
    cfg = EmulatorConfig(port=0, log_requests=False, block_size=conf["block_size"],
                         num_gpu_blocks=conf["num_gpu_blocks"], max_num_batched_tokens=conf["max_num_batched_tokens"],
                         max_num_seqs=conf["max_num_seqs"], max_model_len=conf["max_model_len"],
                         prefix_caching_hash_algo=conf["hash_algo"])
    eng = BatchedEngine(cfg)
    batches: list = []
    eng.set_kv_event_sink(lambda evs: batches.append([wire(e) for e in evs]))
    steps: list[dict] = []
    reqs = {}

    def step() -> bool:
        s = eng.schedule()
        if s.empty:
            eng.flush_kv_events()
            return False
        steps.append({**{c.req.request_id: c.num_tokens for c in s.prefills}, **{r.request_id: 1 for r in s.decodes}})
        eng.complete(s, 0.0)
        eng._flush_step_events()
        return True

    for op in ops:
        if op[0] == "add":
            _, rid, prompt, max_tokens, salt, plp = op
            req = eng.make_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                               prompt_logprobs=plp), cache_salt=salt)
            req.generator = FixedTokens(rid, req.seq)
            eng.requests[rid] = req
            eng.waiting.append(req)
            reqs[rid] = req
        elif op[0] == "step":
            for _ in range(op[1]):
                step()
        elif op[0] == "drain":
            while eng.waiting or eng.running:
                if not step():
                    break
        elif op[0] == "reset":
            eng.reset_prefix_cache()
    eng.block_pool.check_invariants()
    return {"steps": steps, "batches": batches, "preemptions": eng.num_preemptions,
            "cached": {rid: r.num_cached_tokens for rid, r in reqs.items() if r.counted_query}}


def first_difference(ours: dict, theirs: dict) -> str | None:
    for i, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        if a != b:
            return f"step {i}: emulator scheduled {a}, vLLM {b}"
    if len(ours["steps"]) != len(theirs["steps"]):
        return f"{len(ours['steps'])} steps vs vLLM's {len(theirs['steps'])}"
    for i, (a, b) in enumerate(zip(ours["batches"], theirs["batches"])):
        if a != b:
            return f"KV-event batch {i}:\n  emulator {json.dumps(a)[:600]}\n  vLLM     {json.dumps(b)[:600]}"
    if len(ours["batches"]) != len(theirs["batches"]):
        return f"{len(ours['batches'])} KV-event batches vs vLLM's {len(theirs['batches'])}"
    if ours["cached"] != theirs["cached"]:
        diff = {k: (ours["cached"].get(k), theirs["cached"].get(k)) for k in set(ours["cached"]) | set(theirs["cached"])
                if ours["cached"].get(k) != theirs["cached"].get(k)}
        return f"cached tokens (emulator, vLLM): {diff}"
    return None


# The first test to need vLLM builds the toolchain (minutes on a fresh machine): give it room.
@pytest.mark.timeout(1800)
def test_engine_schedules_and_publishes_exactly_as_vllms_scheduler(vllm_toolchain, request):
    py, model_dir = str(vllm_toolchain.python), str(vllm_toolchain.model)
    scenarios = [scenario(seed) for seed in range(SCENARIOS)] + [exact_fit()]
    payload = {"model_dir": model_dir,
               "scenarios": [{"config": config_for(seed), "ops": ops} for seed, ops in enumerate(scenarios)]}
    say(request, f"scheduler differential: {len(scenarios)} scenarios through vLLM's Scheduler (~1 min)")
    out = subprocess.run([py, str(DRIVER)], input=json.dumps(payload),
                         capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert out.returncode == 0, out.stderr[-3000:]
    traces = json.loads(out.stdout)
    totals = {"requests": 0, "steps": 0, "batches": 0, "events": 0, "preemptions": 0}
    for seed, (ops, theirs) in enumerate(zip(scenarios, traces)):
        ours = run_emulator(ops, config_for(seed))
        diff = first_difference(ours, theirs)
        assert diff is None, f"scenario {seed} ({config_for(seed)}): {diff}\nops: {json.dumps(ops)[:3000]}"
        totals["preemptions"] += ours["preemptions"]
        totals["requests"] += len(theirs["cached"])
        totals["steps"] += len(theirs["steps"])
        totals["batches"] += len(theirs["batches"])
        totals["events"] += sum(len(b) for b in theirs["batches"])
    print(f"equal to vLLM 0.32's Scheduler over {len(scenarios)} scenarios: {totals}")
