#!/bin/bash
# The simulated `lora` sweep's point checked on the wall clock: 4 real `python -m emulator` processes
# serving 8 LoRA adapters each (2 slots, 20 ms to load one), a real `python -m proxy` over them,
# `loadgen compare` of kv_aware, round robin and least loaded (lora workload, 6 req/s, 600 requests,
# seed 1), then kv_aware again with its adapter-slot term off (kv_aware.lora_slot_weight=0), into
# docs/results/lora-wall/{compare,slots-unpriced}/. The simulation of the same point:
# docs/results/sim/lora-4/*/rate-6/seed-1/summary.json. Time scale 1.0 (about 8 minutes). Starts
# every process it uses on loopback and stops them by PID. Run from the repository root:
#   bash docs/results/run-lora-wall.sh
set -e
PY=${PY:-.venv/bin/python}
EPORT=${EPORT:-18401}
PPORT=${PPORT:-18400}
OUT=${OUT:-docs/results/lora-wall}
LOG=$(mktemp -d)
MODS=()
for k in 0 1 2 3 4 5 6 7; do MODS+=("lora-$k=/adapters/lora-$k"); done
PIDS=() BACKENDS=()
trap 'kill ${PIDS[*]} 2>/dev/null; wait 2>/dev/null' EXIT
for i in 0 1 2 3; do
  $PY -m emulator --host 127.0.0.1 --port $((EPORT + i)) --lora-modules "${MODS[@]}" --max-loras 2 --lora-load-s 0.02 \
    --time-scale 1.0 --no-log-requests > "$LOG/emulator-$i.log" 2>&1 &
  PIDS+=($!)
  BACKENDS+=(--backend "http://127.0.0.1:$((EPORT + i))")
done
source "$(dirname "$0")/wait-for.sh"  # wait_for URL
for i in 0 1 2 3; do wait_for "http://127.0.0.1:$((EPORT + i))/health"; done
RUN="--target http://127.0.0.1:$PPORT/v1 --reset-target --workload lora --adapters 8 --rate 6 --requests 600 --seed 1 --time-scale 1.0 --no-progress"
proxy() {  # start the proxy with extra flags "$@"; its PID is the last of PIDS
  $PY -m proxy --host 127.0.0.1 --port "$PPORT" "${BACKENDS[@]}" --time-scale 1.0 "$@" > "$LOG/proxy.log" 2>&1 &
  PIDS+=($!)
  wait_for "http://127.0.0.1:$PPORT/v1/models"
}
proxy
$PY -m loadgen compare $RUN --strategies kv_aware,round_robin,least_loaded --out "$OUT/compare"
kill "${PIDS[-1]}" && wait "${PIDS[-1]}" 2>/dev/null || true
unset 'PIDS[-1]'
proxy --policy-param kv_aware.lora_slot_weight=0
$PY -m loadgen compare $RUN --strategies kv_aware --out "$OUT/slots-unpriced"
