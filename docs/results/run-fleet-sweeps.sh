#!/bin/bash
# The lora and multimodel goodput sweeps of issue #23 in virtual time (`loadgen simulate --sweep`):
# kv_aware against sglang, round robin and least loaded on fleets serving LoRA adapters or several
# base models, in docs/results/sim/{lora,multimodel,multimodel-light}-BACKENDS. Deterministic (the
# same flags give the same tables, whatever the machine's load). A fleet of BACKENDS = 4K scales the
# 4-backend setup K times: K x the loads, requests, adapters and system prompts per model.
#   lora: every backend serves every adapter (8K), 2 adapters in a step (--max-loras 2), 20 ms
#     (emulated) to bring an adapter into a slot: which adapters meet on a backend is the router's doing.
#   lora-free-slots: the same with a slot for every adapter (--max-loras 8K, no load time): what is left
#     of adapter affinity when adapters cost nothing to mix (their prefix caches alone).
#   lora-runtime: each adapter on one backend (--lora-copies 1), and the proxy may load it on any other
#     (--lora-runtime-load, POST /v1/load_lora_adapter): where adapters spread is the router's doing.
#   lora-one-copy: the same without runtime loading (each adapter's requests have one backend: every
#     strategy routes alike; the control for what runtime loading is worth).
#   multimodel: two base models, each on half the fleet, 8K system prompts of 2000 tokens per model
#     (more than one backend's cache holds: where a prompt goes matters).
#   multimodel-light: the workload's default prompts (3 of 600 tokens per model, every cache holds them).
# Run from the repository root (heavy: nice it on a shared machine):
#   BACKENDS=4 SEEDS=0,1,2 nice -n 5 bash docs/results/run-fleet-sweeps.sh [lora|lora-free-slots|lora-runtime|lora-one-copy|multimodel|multimodel-light ...]
# After a change to one strategy only, REUSE=sglang,round_robin,least_loaded reads the others' stored
# points (same workload, load, seed and fleet) instead of simulating them again.
set -e
PY=${PY:-.venv/bin/python}
B=${BACKENDS:-4}
K=$((B / 4))
SEEDS=${SEEDS:-0,1,2}
STRATS=${STRATS:-kv_aware,sglang,round_robin,least_loaded}
COMMON="--strategies $STRATS --backends $B --seeds $SEEDS --slo-ttft-p99 1.0 --slo-tpot-p50 0.03${REUSE:+ --reuse $REUSE}"
ONLY="${*:-all}"
scale() { python3 -c "import sys; print(','.join(f'{float(x) * $K:g}' for x in sys.argv[1].split(',')))" "$1"; }
run() {
  name=$1; shift
  case " $ONLY " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  $PY -m loadgen simulate --sweep $COMMON "$@" --out docs/results/sim/$name-$B
}
run lora --workload lora --adapters $((8 * K)) --max-loras 2 --lora-load-s 0.02 --rates "$(scale 2,4,6,8,10,12,16)" --requests $((600 * K))
run lora-free-slots --workload lora --adapters $((8 * K)) --max-loras $((8 * K)) --lora-load-s 0 --rates "$(scale 2,4,6,8,10,12,16)" --requests $((600 * K))
run lora-runtime --workload lora --adapters $((8 * K)) --lora-copies 1 --lora-runtime-load --max-loras 2 --lora-load-s 0.02 --rates "$(scale 4,8,12,16,20,24,32)" --requests $((600 * K))
STRATS_ONE=${STRATS_ONE:-kv_aware,round_robin}
COMMON=${COMMON/--strategies $STRATS/--strategies $STRATS_ONE}
run lora-one-copy --workload lora --adapters $((8 * K)) --lora-copies 1 --max-loras 2 --lora-load-s 0.02 --rates "$(scale 4,8,12,16,20,24,32)" --requests $((600 * K))
COMMON=${COMMON/--strategies $STRATS_ONE/--strategies $STRATS}
run multimodel --workload multimodel --models model-a,model-b --system-prompts $((8 * K)) --system-tokens 2000 --rates "$(scale 4,8,12,16,20,24)" --requests $((600 * K))
run multimodel-light --workload multimodel --models model-a,model-b --rates "$(scale 4,8,16,24)" --requests $((600 * K))
case " $ONLY " in *" all "*)  # sweep-table joins folders of one workload in a row: one table per variant
  $PY -m loadgen sweep-table docs/results/sim/{lora,multimodel}-$B
  $PY -m loadgen sweep-table docs/results/sim/{lora-free-slots,multimodel-light}-$B
  $PY -m loadgen sweep-table docs/results/sim/lora-runtime-$B docs/results/sim/lora-one-copy-$B ;;
esac
