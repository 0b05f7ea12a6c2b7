#!/bin/bash
# The published anchors reproduced on the simulator (`loadgen simulate`, virtual time, deterministic):
#   b2b-saas : llm-d's precise prefix-cache benchmark: 8 backends of Qwen3-32B on 2 x H100 (TP 2), 150
#              customers x 6,000-token contexts, 5 users x 1,200-token questions, llm-d's Poisson stages
#              (15 QPS warm-up, then 3 -> 60 QPS); 250 output tokens (llm-d's measured 8,730 tok/s / 35.6 req/s).
#   mooncake : Dynamo's A/B: the shipped Mooncake conversation trace (first $MC_REQUESTS requests) on 8
#              backends of Qwen3-32B on 2 x H100, at the trace speeds where round robin overloads.
# Then benchmarks/sim_anchors.py turns each run's records into TTFT p90/mean, output tok/s and goodput beside
# the published figures (anchor.md, anchor.json) and drops the records and plots (repo size).
# Run from the repository root (heavy; CPU ~35 min for b2b-saas, ~15 min for mooncake; nice it):
#   nice -n 5 bash docs/results/run-sim-anchors.sh [b2b-saas] [mooncake]
set -e
PY=${PY:-.venv/bin/python}
ONLY="${*:-all}"
OUT=docs/results/sim
STRATS=${STRATS:-kv_aware,prefix,round_robin,least_loaded,random,sglang}
QWEN="--backends 8 --model Qwen/Qwen3-32B --gpu 2xh100-80gb --profile 2xh100-80gb-qwen3-32b --kv-events"
MC_REQUESTS=${MC_REQUESTS:-1500}
MC_SPEEDS=${MC_SPEEDS:-3 2}
want() { case " $ONLY " in *" all "*|*" $1 "*) return 0 ;; esac; return 1; }
if want b2b-saas; then
  $PY -m loadgen simulate --workload b2b-saas --requests 20000 --b2b-output-tokens 250 --max-model-len 8448 \
    $QWEN --strategies "$STRATS" --out $OUT/anchor-b2b-saas
  $PY -m benchmarks.sim_anchors b2b-saas $OUT/anchor-b2b-saas
fi
if want mooncake; then
  for s in $MC_SPEEDS; do
    $PY -m loadgen simulate --workload trace --requests "$MC_REQUESTS" --trace-speedup "$s" --max-model-len 32768 \
      $QWEN --strategies "$STRATS" --out $OUT/anchor-mooncake-8/speed-$s
  done
  $PY -m benchmarks.sim_anchors mooncake $OUT/anchor-mooncake-8/speed-*
fi
