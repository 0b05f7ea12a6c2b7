"""Commands that measure (`python -m benchmarks.<name>` from the repository root), beside the packages.

Not tests and not shipped: each prints its figures with ratios against a baseline measured in the
same run. proxy_bench (overhead, decide, edge, soak), proxy_inflight, emulator_bench, kv_hit_rate;
peer_bench (kvroute against sglang-router and vllm-router over peer_stub's backends) and
profile_proxy (where kvroute's CPU per request goes); simulate_bench (how fast `loadgen simulate` runs a fleet);
hostile (the hostile-input classes of docs/deploy.md#security).
"""
