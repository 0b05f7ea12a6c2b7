#!/bin/bash
# The goodput sweeps in docs/results/*-sweep and the README's table. Each sweep runs 4 strategies x 3
# loads x 2 seeds (3 for burst and sysprompt) (about 8-13 minutes wall on the 2-core development machine; two can run side by
# side there: the reports print how late the emulators' steps ran). Run from the repository root:
#   bash docs/results/run-sweeps.sh [workload ...]      # default: all of them, then the noise sweep
set -e
PY=${PY:-.venv/bin/python}
STRATS=kv_aware,sglang,round_robin,least_loaded
COMMON="--strategies $STRATS --time-scale 1.0 --seeds 0,1 --slo-ttft-p99 1.0 --slo-tpot-p50 0.03 --max-lateness 0.02 --no-progress"
run() {
  name=$1; shift
  case " ${ONLY:-all} " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  $PY -m loadgen sweep $COMMON "$@" --out docs/results/$name-sweep 2>&1 | grep -v "prefix cache reset"
}
ONLY="${*:-all}"
# burst and sysprompt decide goodput by TPOT p50 within a few % of the SLO: three seeds (the last --seeds wins)
run burst --workload burst --burst-prefixes 4 --rates 8,16,24 --requests 240 --seeds 0,1,2
run sysprompt --workload sysprompt --rates 8,16,24 --requests 240 --seeds 0,1,2
run rag --workload rag --documents 16 --doc-tokens-min 1000 --doc-tokens-max 4000 --rates 4,8,12 --requests 160
run multiturn --workload multiturn --turns 4 --think-time 1 --rates 2,4,6 --requests 160
run tenants --workload tenants --tenants 24 --tenant-tokens 2000 --rates 3,6,9 --requests 144
run mixed --workload mixed --turns 4 --rates 4,8,12 --requests 160
run trace --workload trace --trace-max-output 128 --rates 1,1.5,2 --requests 90
# Run-to-run noise on its own: the burst point at 16 req/s over three seeds.
COMMON="${COMMON/--seeds 0,1/--seeds 0,1,2}"
run noise --workload burst --burst-prefixes 4 --rates 16 --requests 240
case " ${ONLY:-all} " in *" all "*)
  $PY -m loadgen sweep-table docs/results/{burst,rag,sysprompt,multiturn,tenants,mixed,trace}-sweep ;;
esac
