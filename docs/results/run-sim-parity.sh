#!/bin/bash
# The simulation against the wall clock (issue #21): each workload simulated and run for real through
# `python -m proxy --emulators 4` at time scale 1, same seed; docs/results/sim/parity-<workload>/parity.json
# and the table printed per workload (limits: hit rate 1 point, TTFT p50/p99 and E2E p50 10%, requests per
# backend 5%). The wall runs need the CPU they model: on a busy machine their engine steps run late
# (`lateness_ms` in parity.json) and their latencies drift up. Run from the repository root:
#   bash docs/results/run-sim-parity.sh [workload ...]
set -e
PY=${PY:-.venv/bin/python}
ONLY="${*:-all}"
run() {
  name=$1; shift
  case " $ONLY " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  echo "## $name"
  $PY -m loadgen simulate --against-wall --strategies kv_aware,round_robin "$@" --out docs/results/sim/parity-$name || true
}
run rag --workload rag --documents 16 --rate 4 --requests 120
run burst --workload burst --burst-prefixes 4 --rate 8 --requests 160
run sysprompt --workload sysprompt --rate 8 --requests 160
run multiturn --workload multiturn --turns 4 --think-time 1 --rate 2 --requests 96
run trace --workload trace --trace-max-output 128 --trace-speedup 2 --requests 90
run rotating --workload rotating-prefix --output-tokens 16 --rate 10 --requests 300
