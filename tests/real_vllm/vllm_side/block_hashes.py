"""Run in the vLLM venv: vLLM's own block hashes for the cases on stdin (JSON), as JSON on stdout.

Each case: {"tokens": [...], "block_size": N, "algo": "sha256"|"sha256_cbor", "cache_salt": str|null,
"lora": [name, path]|null (absent: none)}.
The hashes come from a real `vllm.v1.request.Request` through `get_request_block_hasher`, i.e. the
code path the scheduler uses; NONE_HASH is initialised from this process's PYTHONHASHSEED.
"""
import json
import sys

from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request


def main() -> None:
    cases = json.load(sys.stdin)
    out = []
    for i, c in enumerate(cases):
        fn = get_hash_fn_by_name(c["algo"])
        kv_cache_utils.init_none_hash(fn)
        hasher = kv_cache_utils.get_request_block_hasher(c["block_size"], fn)
        lora = LoRARequest(c["lora"][0], 1 + i, c["lora"][1]) if c.get("lora") else None
        req = Request(f"r{i}", c["tokens"], SamplingParams(max_tokens=1), None,
                      cache_salt=c.get("cache_salt"), lora_request=lora, block_hasher=hasher)
        extra = [kv_cache_utils.generate_block_hash_extra_keys(req, j * c["block_size"], (j + 1) * c["block_size"], 0)[0]
                 for j in range(len(req.block_hashes))]
        out.append({
            "hashes": [bytes(h).hex() for h in req.block_hashes],
            "event_extra_keys": kv_cache_utils.to_event_extra_keys(extra),
        })
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
