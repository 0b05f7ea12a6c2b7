#!/bin/bash
# The one-run strategy comparisons in docs/results/*-compare (the tables in docs/loadgen.md), one after the
# other (about 2-5 minutes wall each on the 2-core development machine). From the repository root:
#   bash docs/results/run-compares.sh [name ...]      # default: all of them
set -e
PY=${PY:-.venv/bin/python}
FIVE=kv_aware,sglang,prefix,round_robin,least_loaded
RAG="--documents 16 --doc-tokens-min 1000 --doc-tokens-max 4000 --zipf-s 1.1 --output-tokens 64"
run() {
  name=$1; shift
  case " ${ONLY:-all} " in *" all "*|*" $name "*) ;; *) return 0 ;; esac
  $PY -m loadgen compare "$@" --time-scale 0.5 --seed 0 --no-progress --out docs/results/$name-compare 2>&1 \
    | grep -v "prefix cache reset"
}
ONLY="${*:-all}"
run rag --workload rag --strategies default,round_robin,least_loaded --requests 600 --rate 8 $RAG
run rag-strategies --workload rag --strategies $FIVE --requests 400 --rate 8 $RAG
run multiturn --workload multiturn --strategies $FIVE --requests 480 --concurrency 24
run sysprompt --workload sysprompt --strategies $FIVE --requests 400 --rate 8
run trace-moderate --workload trace --strategies $FIVE --requests 200 --trace-speedup 1 --trace-max-output 128
run trace --workload trace --strategies $FIVE --requests 300 --trace-speedup 2 --trace-max-output 128
