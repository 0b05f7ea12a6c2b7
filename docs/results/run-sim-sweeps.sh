#!/bin/bash
# Fleet-scale goodput sweeps in virtual time (`loadgen simulate --sweep`): the workloads of
# sweep-workloads.sh with the fleet scaled K = BACKENDS/4 times: K x the loads, the requests and the
# shared contexts (documents, tenants, system prompts, burst prefixes), so each backend sees what it
# saw in the 4-backend wall-clock sweeps. Deterministic: the same flags give the same tables.
# Run from the repository root (heavy: nice it on a shared machine):
#   BACKENDS=16 SEEDS=0,1,2 nice -n 19 bash docs/results/run-sim-sweeps.sh [workload ...]
# After a change to one strategy only, REUSE=round_robin,least_loaded,sglang reads the others' stored
# points (same workload, load, seed and fleet) instead of simulating them again.
set -e
PY=${PY:-.venv/bin/python}
B=${BACKENDS:-16}
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
run burst --workload burst --burst-prefixes $((4 * K)) --rates "$(scale 8,16,24)" --requests $((240 * K))
run sysprompt --workload sysprompt --system-prompts $((3 * K)) --rates "$(scale 8,16,24)" --requests $((240 * K))
run rag --workload rag --documents $((16 * K)) --doc-tokens-min 1000 --doc-tokens-max 4000 --rates "$(scale 4,8,12)" --requests $((160 * K))
run multiturn --workload multiturn --turns 4 --think-time 1 --rates "$(scale 2,4,6)" --requests $((160 * K))
run tenants --workload tenants --tenants $((24 * K)) --tenant-tokens 2000 --rates "$(scale 3,6,9)" --requests $((144 * K))
run mixed --workload mixed --documents $((16 * K)) --turns 4 --rates "$(scale 4,8,12)" --requests $((160 * K))
run trace --workload trace --trace-max-output 128 --rates "$(scale 1,1.5,2)" --requests $((90 * K))
run rotating --workload rotating-prefix --output-tokens 16 --rates "$(scale 5,10,20)" --requests $((300 * K))
case " $ONLY " in *" all "*)
  $PY -m loadgen sweep-table docs/results/sim/{burst,sysprompt,rag,multiturn,tenants,mixed,trace,rotating}-$B ;;
esac
