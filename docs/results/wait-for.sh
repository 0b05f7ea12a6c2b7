# Sourced by the run-*.sh scripts that start servers: wait_for URL polls (bounded, 30 s) until the URL
# answers 200, else prints where the logs are ($LOG) and exits 1. Needs $PY (a Python with no extras).
wait_for() {
  for _ in $(seq 150); do
    $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "$1 never answered; logs in $LOG" >&2; exit 1
}
