#!/bin/bash
# The real sglang-router (cache_aware, its defaults) swept on the workloads, loads and seeds of
# run-sweeps.sh (`sweep-workloads.sh`), into docs/results/<workload>-sweep-sglang-router/; the table
# at the end puts it in the row of each kvroute sweep. Run from the repository root:
#   bash docs/results/run-peer-sweeps.sh [workload ...]      # default: all of them
# sglang-router is not a kvroute dependency; it needs its own venv (from the package registry):
#   python3.11 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install sglang-router==0.3.2
# Starts 4 emulators (one `python -m emulator --replicas 4` process, time scale 1.0) and the router
# on loopback, and stops both by PID. The router's own tree is not reset between points (it has no
# API for that): it meets cold caches as after a backend restart.
set -e
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-/tmp/peers-venv/bin/python}
PEER=${PEER:-sglang-router}
EPORT=${EPORT:-18201}
RPORT=${RPORT:-18300}
"$PEERS_PY" -c "import sglang_router" 2>/dev/null || { echo "no sglang_router in $PEERS_PY (see the header)" >&2; exit 2; }
LOG=$(mktemp -d)
WORKERS=() BACKENDS=()
for i in 0 1 2 3; do
  WORKERS+=("http://127.0.0.1:$((EPORT + i))")
  BACKENDS+=(--backend "http://127.0.0.1:$((EPORT + i))")
done
$PY -m emulator --host 127.0.0.1 --port "$EPORT" --replicas 4 --time-scale 1.0 --no-log-requests > "$LOG/emulators.log" 2>&1 &
EPID=$!
RPID=""
trap 'kill $EPID ${RPID} 2>/dev/null; wait 2>/dev/null' EXIT
source "$(dirname "$0")/wait-for.sh"  # wait_for URL
for w in "${WORKERS[@]}"; do wait_for "$w/health"; done
"$PEERS_PY" -m sglang_router.launch_router --host 127.0.0.1 --port "$RPORT" --worker-urls "${WORKERS[@]}" \
  --policy cache_aware --log-level warn > "$LOG/router.log" 2>&1 &
RPID=$!
wait_for "http://127.0.0.1:$RPORT/v1/models"
VERSION=$("$PEERS_PY" -c "from importlib.metadata import version; print(version('sglang-router'))")
echo "$PEER $VERSION (cache_aware) at http://127.0.0.1:$RPORT over ${WORKERS[*]}"
COMMON="--time-scale 1.0 --seeds 0,1 --slo-ttft-p99 1.0 --slo-tpot-p50 0.03 --max-lateness 0.02 --no-progress"
run() {
  name=$1; shift
  case " ${ONLY:-all} " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  $PY -m loadgen sweep --peer "$PEER-$VERSION" --target "http://127.0.0.1:$RPORT/v1" --reset-target "${BACKENDS[@]}" \
    $COMMON "$@" --out "docs/results/$name-sweep-$PEER" 2>&1 | grep -v "prefix cache reset"
}
ONLY="${*:-all}"
source "$(dirname "$0")/sweep-workloads.sh"
for w in burst rag sysprompt multiturn tenants mixed trace; do
  [ -f "docs/results/$w-sweep/sweep.json" ] && [ -f "docs/results/$w-sweep-$PEER/sweep.json" ] && F+=("docs/results/$w-sweep" "docs/results/$w-sweep-$PEER")
done
[ ${#F[@]} -gt 0 ] && $PY -m loadgen sweep-table "${F[@]}"
