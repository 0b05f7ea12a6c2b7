# The goodput sweeps' workloads, loads and seeds, one `run NAME ARGS...` each: sourced by
# run-sweeps.sh (kvroute's strategies) and run-peer-sweeps.sh (a peer router), which define `run`.
# Three seeds (the last --seeds wins) where the verdicts hinge on a few %: burst and sysprompt (TPOT p50
# at the SLO decides goodput) and trace (regrets of 1-9% on 90 requests)
run burst --workload burst --burst-prefixes 4 --rates 8,16,24 --requests 240 --seeds 0,1,2
run sysprompt --workload sysprompt --rates 8,16,24 --requests 240 --seeds 0,1,2
run rag --workload rag --documents 16 --doc-tokens-min 1000 --doc-tokens-max 4000 --rates 4,8,12 --requests 160
run multiturn --workload multiturn --turns 4 --think-time 1 --rates 2,4,6 --requests 160
run tenants --workload tenants --tenants 24 --tenant-tokens 2000 --rates 3,6,9 --requests 144
run mixed --workload mixed --turns 4 --rates 4,8,12 --requests 160
run trace --workload trace --trace-max-output 128 --rates 1,1.5,2 --requests 90 --seeds 0,1,2
