"""Engine behaviour driven directly (no HTTP): timing in emulated seconds, batching, admission,
preemption, cancellation, and that every block is released afterwards."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from emulator.config import EmulatorConfig
from emulator.engine import BatchedEngine, SimpleEngine, make_engine
from kvblocks.latency import get_profile
from emulator.metrics import EngineMetrics
from emulator.request import SamplingParams

PROFILE = get_profile("a100-40gb-llama2-13b")


def engine_for(**kw) -> BatchedEngine | SimpleEngine:
    if "num_gpu_blocks" in kw:  # a small cache: the longest request it can hold (vLLM refuses more)
        kw.setdefault("max_model_len", (kw["num_gpu_blocks"] - 1) * kw.get("block_size", 16))
    cfg = EmulatorConfig(port=0, time_scale=kw.pop("time_scale", 0.02), log_requests=False, **kw)
    metrics = EngineMetrics(cfg)
    eng = make_engine(cfg, metrics=metrics)
    metrics.bind(eng)
    return eng


async def run(engine, req):
    async with contextlib.aclosing(engine.generate(req)) as gen:
        return [o async for o in gen]


def prompt(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def assert_idle(engine) -> None:
    assert engine.block_pool.num_referenced_blocks() == 0
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.num_unfinished == 0
    engine.block_pool.check_invariants()


@pytest.mark.parametrize("kind", ["batched", "simple"])
async def test_isolated_request_timing_is_exact_in_emulated_time(kind):
    eng = engine_for(engine=kind)
    req = eng.make_request("r", prompt(40), SamplingParams(max_tokens=10))
    outs = await run(eng, req)
    assert [o.num_output_tokens for o in outs] == list(range(1, 11))
    assert outs[-1].finish_reason == "length"
    assert req.timings.ttft == pytest.approx(PROFILE.isolated_ttft(3), abs=1e-9)  # 40 tokens -> 3 blocks
    gaps = [b - a for a, b in zip(req.token_times, req.token_times[1:])]
    assert gaps == pytest.approx([PROFILE.decode_per_token] * 9, abs=1e-9)
    assert req.timings.e2e == pytest.approx(PROFILE.isolated_latency(3, 10), abs=1e-9)
    assert_idle(eng)


async def test_isolated_request_wall_clock_follows_time_scale():
    scale = 0.5
    eng = engine_for(time_scale=scale)
    req = eng.make_request("r", prompt(100), SamplingParams(max_tokens=8))
    t0 = time.monotonic()
    await run(eng, req)
    wall = time.monotonic() - t0
    expected = PROFILE.isolated_latency(7, 8) * scale
    assert expected * 0.97 <= wall <= expected + 0.25, (wall, expected)  # slack for loaded CI hosts


async def test_prefix_hit_shortens_ttft_and_is_capped():
    eng = engine_for()
    first = eng.make_request("a", prompt(64), SamplingParams(max_tokens=1))
    await run(eng, first)
    again = eng.make_request("b", prompt(64), SamplingParams(max_tokens=1))
    outs = await run(eng, again)
    assert outs[0].num_cached_tokens == 48  # 4 full blocks cached, capped at (64-1)//16 = 3
    assert again.timings.ttft == pytest.approx(PROFILE.isolated_ttft(1, cached_blocks=3), abs=1e-9)
    assert eng.kv_cache_manager.stats.queries == 128 and eng.kv_cache_manager.stats.hits == 48


async def test_batching_slows_every_step():
    eng = engine_for()
    a = eng.make_request("a", prompt(32, 1000), SamplingParams(max_tokens=5))
    b = eng.make_request("b", prompt(48, 5000), SamplingParams(max_tokens=5))
    # Both arrive before the first step, so they are prefilled together and then decode as a batch of 2.
    ra, rb = await asyncio.gather(run(eng, a), run(eng, b))
    joint_prefill = PROFILE.step_time(2 + 3, True, 0)
    assert a.timings.ttft == pytest.approx(joint_prefill, abs=1e-6)
    assert b.timings.first_token == a.timings.first_token  # b arrived a moment later, same step
    gaps = [y - x for x, y in zip(a.token_times, a.token_times[1:])]
    assert gaps == pytest.approx([PROFILE.decode_step(2)] * 4, abs=1e-9)
    assert PROFILE.decode_step(2) > PROFILE.decode_per_token
    assert_idle(eng)


async def test_decode_batch_includes_newly_admitted_prefill():
    eng = engine_for()
    a = eng.make_request("a", prompt(16), SamplingParams(max_tokens=6))
    task = asyncio.create_task(run(eng, a))
    while a.timings.first_token is None:  # wait for a's first token, then add b mid-decode
        await asyncio.sleep(0.001)
    b = eng.make_request("b", prompt(16, 9000), SamplingParams(max_tokens=2))
    await asyncio.gather(task, run(eng, b))
    gaps = [y - x for x, y in zip(a.token_times, a.token_times[1:])]
    # the step that prefilled b also decoded a: it took prefill + decode time
    assert any(g == pytest.approx(PROFILE.step_time(1, True, 1), abs=1e-9) for g in gaps)
    assert max(gaps) > PROFILE.decode_per_token
    assert_idle(eng)


async def test_admission_waits_for_blocks():
    eng = engine_for(num_gpu_blocks=6)  # 5 usable blocks
    a = eng.make_request("a", prompt(48), SamplingParams(max_tokens=12))  # grows to 4 blocks
    b = eng.make_request("b", prompt(48, 7000), SamplingParams(max_tokens=2))  # needs 3 (+1 lookahead)
    ta = asyncio.create_task(run(eng, a))
    tb = asyncio.create_task(run(eng, b))
    await asyncio.sleep(0)
    while a.timings.first_token is None:
        await asyncio.sleep(0.001)
    assert eng.num_running == 1 and eng.num_waiting == 1
    await asyncio.gather(ta, tb)
    assert b.timings.first_scheduled >= a.timings.finished - 1e-9
    assert b.timings.queue_time > 0
    assert_idle(eng)


async def test_preemption_of_newest_request_and_recompute():
    eng = engine_for(num_gpu_blocks=6)
    alone = engine_for(num_gpu_blocks=6)
    b_params = SamplingParams(max_tokens=12)
    ref = await run(alone, alone.make_request("b", prompt(30, 5000), b_params))
    a = eng.make_request("a", prompt(30), SamplingParams(max_tokens=40))  # grows to 5 blocks
    b = eng.make_request("b", prompt(30, 5000), b_params)
    ra, rb = await asyncio.gather(run(eng, a), run(eng, b))
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert eng.num_preemptions == b.num_preemptions
    assert [o.token_id for o in rb] == [o.token_id for o in ref], "a preempted request resumes its own stream"
    assert ra[-1].num_output_tokens == 40 and rb[-1].num_output_tokens == 12
    assert eng.metrics.preemptions._value.get() == eng.num_preemptions
    assert_idle(eng)


async def test_closing_the_stream_aborts_and_frees_blocks():
    eng = engine_for()
    req = eng.make_request("r", prompt(100), SamplingParams(max_tokens=500))
    gen = eng.generate(req)
    first = await anext(gen)
    assert first.num_output_tokens == 1
    assert eng.block_pool.num_referenced_blocks() > 0
    await gen.aclose()
    assert req.finish_reason == "abort"
    assert_idle(eng)
    assert eng.metrics.success["abort"]._value.get() == 1


@pytest.mark.parametrize("kind", ["batched", "simple"])
async def test_cancelling_a_waiting_consumer_frees_blocks(kind):
    eng = engine_for(engine=kind)
    reqs = [eng.make_request(f"r{i}", prompt(64, 1000 * i), SamplingParams(max_tokens=300)) for i in range(3)]
    tasks = [asyncio.create_task(run(eng, r)) for r in reqs]
    while any(r.timings.first_token is None for r in reqs):
        await asyncio.sleep(0.001)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r.finish_reason == "abort" for r in reqs)
    assert_idle(eng)


async def test_simple_engine_requests_do_not_slow_each_other():
    eng = engine_for(engine="simple")
    a = eng.make_request("a", prompt(32), SamplingParams(max_tokens=4))
    b = eng.make_request("b", prompt(32, 4000), SamplingParams(max_tokens=4))
    await asyncio.gather(run(eng, a), run(eng, b))
    for r in (a, b):
        assert r.timings.ttft == pytest.approx(PROFILE.isolated_ttft(2), abs=1e-3)
        gaps = [y - x for x, y in zip(r.token_times, r.token_times[1:])]
        assert gaps == pytest.approx([PROFILE.decode_per_token] * 3, abs=1e-9)
    assert_idle(eng)


async def test_kv_events_reach_the_sink_per_step_with_evictions_first():
    eng = engine_for(num_gpu_blocks=4)  # 3 usable blocks
    batches = []
    eng.set_kv_event_sink(batches.append)
    await run(eng, eng.make_request("a", prompt(33), SamplingParams(max_tokens=1)))
    await run(eng, eng.make_request("b", prompt(33, 8000), SamplingParams(max_tokens=1)))
    kinds = [[type(e).__name__ for e in batch] for batch in batches]
    assert kinds[0] == ["BlockStored"]
    assert kinds[1] == ["BlockRemoved", "BlockRemoved", "BlockStored"]
    n = len(batches)
    assert eng.reset_prefix_cache()
    assert len(batches) == n, "vLLM queues AllBlocksCleared for the next step's batch"
    await run(eng, eng.make_request("c", prompt(17, 3000), SamplingParams(max_tokens=1)))
    assert [type(e).__name__ for e in batches[-1]] == ["AllBlocksCleared", "BlockStored"]


async def test_kv_events_are_one_batch_per_engine_step():
    """vLLM publishes one batch per engine step, however many requests cached blocks in it."""
    eng = engine_for()
    stamped = []
    eng.set_kv_event_sink(lambda evs: stamped.append((eng.num_steps, evs)))
    reqs = [eng.make_request(f"r{i}", prompt(40, 1000 * (i + 2)), SamplingParams(max_tokens=20, ignore_eos=True))
            for i in range(4)]
    await asyncio.gather(*(run(eng, r) for r in reqs))
    batches = [b for _, b in stamped]
    stored = [h for b in batches for e in b if type(e).__name__ == "BlockStored" for h in e.block_hashes]
    assert len(stored) >= 12  # 4 prompts x 2 full blocks, plus the third filled while decoding
    steps = [k for k, _ in stamped]
    assert len(steps) == len(set(steps)), "two batches in one engine step"
    assert any(len(b) > 1 for b in batches)  # the four admissions share their step's batch
    assert_idle(eng)


async def test_request_that_can_never_fit_is_rejected():
    from kvblocks import APIError

    eng = engine_for(num_gpu_blocks=4)
    with pytest.raises(APIError) as e:
        eng.make_request("x", prompt(40), SamplingParams(max_tokens=20))
    assert e.value.status == 400


async def test_engine_loop_stops_when_idle():
    eng = engine_for()
    await run(eng, eng.make_request("r", prompt(10), SamplingParams(max_tokens=2)))
    await asyncio.sleep(0)
    assert eng._task is None


async def test_a_starved_loop_never_schedules_a_request_before_it_arrived():
    eng = engine_for(time_scale=0.02)
    a = eng.make_request("a", prompt(16), SamplingParams(max_tokens=200))
    ta = asyncio.create_task(run(eng, a))
    while a.timings.first_token is None:
        await asyncio.sleep(0.001)
    time.sleep(0.05)  # fault injection: the event loop is starved for 2.5 emulated seconds
    b = eng.make_request("b", prompt(16, 3000), SamplingParams(max_tokens=3))
    await run(eng, b)
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
    assert b.timings.queue_time >= 0 and b.timings.ttft >= PROFILE.step_time(1, True, 1) - 1e-9
    assert eng.metrics.h_lateness.sum > 0.04  # the lag is visible in the lateness histogram
