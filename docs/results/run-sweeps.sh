#!/bin/bash
# The goodput sweeps in docs/results/*-sweep and the table in docs/loadgen.md. Each sweep runs 4 strategies x 3
# loads x 2 seeds, 3 for burst, sysprompt and trace (`sweep-workloads.sh`; about 8-15 minutes wall each on
# the 2-core development machine; two can run side by side there: the reports print how late the
# emulators' steps ran). Run from the repository root:
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
source "$(dirname "$0")/sweep-workloads.sh"
# Run-to-run noise on its own: the burst point at 16 req/s over three seeds.
COMMON="${COMMON/--seeds 0,1/--seeds 0,1,2}"
run noise --workload burst --burst-prefixes 4 --rates 16 --requests 240
case " ${ONLY:-all} " in *" all "*)
  $PY -m loadgen sweep-table docs/results/{burst,rag,sysprompt,multiturn,tenants,mixed,trace}-sweep ;;
esac
