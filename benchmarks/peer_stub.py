"""Zero-delay stub LLM backends for `benchmarks.peer_bench`: a tiny stub that speaks enough of the vLLM / SGLang OpenAI HTTP API
for peer routers (sglang-router, vllm-router, LiteLLM proxy) to accept it.

One process can serve several ports (one aiohttp site per port, same event
loop) so that "direct" and "routed" runs see the same backend CPU capacity.

Every response carries the header  X-Backend: <port>  and every completion body
(including every SSE chunk) carries  "system_fingerprint": "stub-<port>"  so a
client can tell which backend served it even if a router drops headers.

Endpoints:
  GET  /health /health_generate /ping            -> 200
  GET  /v1/models                                -> model list (one model)
  GET  /metrics                                  -> a few vllm:* / sglang:* gauges at 0
  GET  /get_model_info /model_info               -> sglang-style model info
  GET  /get_server_info /server_info             -> sglang-style server info
  GET  /version                                  -> {"version": "stub"}
  GET  /get_load                                 -> sglang-style load ({"num_tokens":0,...})
  POST /v1/completions/render /v1/chat/completions/render
                                                 -> [{"token_ids": [...]}] (vLLM render API; fake
                                                    one-id-per-word tokenizer); vllm-router's
                                                    cache_aware policy calls it before every request
  POST /tokenize                                 -> {"count", "tokens", ...} (vLLM tokenize API)
  POST /flush_cache                              -> 200
  POST /v1/completions       (stream true/false) -> fixed short completion
  POST /v1/chat/completions  (stream true/false) -> fixed short completion
  POST /generate                                 -> sglang-native fixed answer
  GET  /stub/stats                               -> per-port request counters, current delay
  POST /stub/config {"delay_ms": X, "itl_ms": Y}  -> change the delay of all ports of the process
  anything else -> 404, and the method/path is logged to stderr (to discover
                   what a router insists on)

Usage:
  python -m benchmarks.peer_stub --ports 18001 18002 18003 18004 [--delay-ms 0]
      [--tokens 4] [--itl-ms 0] [--model stub-model]
"""
import argparse
import asyncio
import json
import logging
import sys
import time
import zlib

from aiohttp import web

H2_PROBES = {"n": 0}


class _DropH2Probe(logging.Filter):
    """sglang-router probes every worker once with an HTTP/2 (gRPC) preface at registration;
    aiohttp (HTTP/1.1 only) rejects it with a 'PRI/Upgrade' BadHttpMessage traceback. Count it
    instead of printing a traceback per probe."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and "PRI/Upgrade" in str(exc):
            H2_PROBES["n"] += 1
            return False
        return True


logging.getLogger("aiohttp.server").addFilter(_DropH2Probe())

TEXT_TOKENS = [" stub", " reply", " from", " backend", " ok", " done", " yes", " fine"]


def build_app(port: int, args, stats: dict, cfg: dict) -> web.Application:
    """cfg is shared by all ports of this process: {"delay": s, "itl": s}; POST /stub/config
    {"delay_ms": X, "itl_ms": Y} on any port changes it for all of them."""
    model = args.model
    ntok = args.tokens
    fp = f"stub-{port}"
    hdrs = {"X-Backend": str(port)}
    created = int(time.time())
    counter = {"n": 0}
    st = stats.setdefault(port, {"completions": 0, "chat": 0, "other": 0, "unknown": 0, "paths": {}})
    paths = st["paths"]

    metrics_text = (
        "# HELP vllm:num_requests_running Number of requests running.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{model}"}} 0.0\n'
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="{model}"}} 0.0\n'
        "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        f'vllm:gpu_cache_usage_perc{{model_name="{model}"}} 0.0\n'
        "# HELP vllm:kv_cache_usage_perc KV-cache usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{model_name="{model}"}} 0.0\n'
        "# HELP sglang:num_running_reqs Running requests.\n"
        "# TYPE sglang:num_running_reqs gauge\n"
        f'sglang:num_running_reqs{{model_name="{model}"}} 0.0\n'
        "# HELP sglang:num_queue_reqs Queued requests.\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        f'sglang:num_queue_reqs{{model_name="{model}"}} 0.0\n'
    )

    def nid(prefix):
        counter["n"] += 1
        return f"{prefix}-{port}-{counter['n']}"

    def usage():
        return {"prompt_tokens": 8, "completion_tokens": ntok, "total_tokens": 8 + ntok}

    def bump(req):
        key = f"{req.method} {req.path}"
        paths[key] = paths.get(key, 0) + 1

    async def ok(req):
        bump(req)
        return web.Response(text="", headers=hdrs)

    async def models(req):
        bump(req)
        return web.json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                         "owned_by": "stub", "root": model, "parent": None,
                                         "max_model_len": 32768}]},
            headers=hdrs)

    async def metrics(req):
        bump(req)
        return web.Response(text=metrics_text, content_type="text/plain", headers=hdrs)

    async def model_info(req):
        bump(req)
        return web.json_response({"model_path": model, "tokenizer_path": model,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": "default", "has_image_understanding": False,
                                  "has_audio_understanding": False, "model_type": "llama",
                                  "architectures": ["LlamaForCausalLM"]}, headers=hdrs)

    async def server_info(req):
        bump(req)
        return web.json_response({"model_path": model, "tokenizer_path": model,
                                  "served_model_name": model, "dp_size": 1, "tp_size": 1,
                                  "load_balance_method": "round_robin", "disaggregation_mode": "null",
                                  "max_total_num_tokens": 1 << 20, "version": "stub",
                                  "internal_states": [{"last_gen_throughput": 0.0}]}, headers=hdrs)

    async def version(req):
        bump(req)
        return web.json_response({"version": "stub"}, headers=hdrs)

    async def get_load(req):
        bump(req)
        return web.json_response([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0,
                                   "num_tokens": 0}], headers=hdrs)

    async def read_body(req):
        try:
            return await req.json()
        except Exception:
            return {}

    async def completions(req: web.Request):
        st["completions"] += 1
        body = await read_body(req)
        delay, itl = cfg["delay"], cfg["itl"]
        if delay:
            await asyncio.sleep(delay)
        mdl = body.get("model") or model
        cid = nid("cmpl")
        if not body.get("stream"):
            return web.json_response(
                {"id": cid, "object": "text_completion", "created": int(time.time()), "model": mdl,
                 "system_fingerprint": fp,
                 "choices": [{"index": 0, "text": "".join(TEXT_TOKENS[:ntok]), "logprobs": None,
                              "finish_reason": "length", "stop_reason": None}],
                 "usage": usage()}, headers=hdrs)
        resp = web.StreamResponse(headers={**hdrs, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(req)
        now = int(time.time())
        for i in range(ntok):
            if i and itl:
                await asyncio.sleep(itl)
            chunk = {"id": cid, "object": "text_completion", "created": now, "model": mdl,
                     "system_fingerprint": fp,
                     "choices": [{"index": 0, "text": TEXT_TOKENS[i % len(TEXT_TOKENS)],
                                  "logprobs": None,
                                  "finish_reason": "length" if i == ntok - 1 else None,
                                  "stop_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            u = {"id": cid, "object": "text_completion", "created": now, "model": mdl,
                 "system_fingerprint": fp, "choices": [], "usage": usage()}
            await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def chat(req: web.Request):
        st["chat"] += 1
        body = await read_body(req)
        delay, itl = cfg["delay"], cfg["itl"]
        if delay:
            await asyncio.sleep(delay)
        mdl = body.get("model") or model
        cid = nid("chatcmpl")
        if not body.get("stream"):
            return web.json_response(
                {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": mdl,
                 "system_fingerprint": fp,
                 "choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": "".join(TEXT_TOKENS[:ntok])},
                              "logprobs": None, "finish_reason": "length"}],
                 "usage": usage()}, headers=hdrs)
        resp = web.StreamResponse(headers={**hdrs, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(req)
        now = int(time.time())
        first = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": mdl,
                 "system_fingerprint": fp,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]}
        await resp.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        for i in range(ntok):
            if i and itl:
                await asyncio.sleep(itl)
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": mdl,
                     "system_fingerprint": fp,
                     "choices": [{"index": 0, "delta": {"content": TEXT_TOKENS[i % len(TEXT_TOKENS)]},
                                  "logprobs": None,
                                  "finish_reason": "length" if i == ntok - 1 else None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            u = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": mdl,
                 "system_fingerprint": fp, "choices": [], "usage": usage()}
            await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def fake_tokens(text):
        # cheap deterministic "tokenizer": one id per whitespace-separated word
        return [zlib.crc32(w.encode()) & 0xFFFF for w in text.split()]

    def prompt_text(body):
        if "prompt" in body:
            p = body.get("prompt")
            if isinstance(p, list):
                return " ".join(x if isinstance(x, str) else " ".join(map(str, x)) for x in p)
            return str(p or "")
        msgs = body.get("messages") or []
        out = []
        for m in msgs:
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(part.get("text", "") for part in c if isinstance(part, dict))
            out.append(f"<|{m.get('role', 'user')}|> {c or ''}")
        return " ".join(out)

    async def render(req: web.Request):
        # vLLM >= 0.11 style /v1/completions/render and /v1/chat/completions/render:
        # a list with one entry per prompt holding token_ids (+ a few fields).
        bump(req)
        body = await read_body(req)
        ids = fake_tokens(prompt_text(body))
        return web.json_response([{"token_ids": ids, "model": body.get("model") or model,
                                   "request_id": nid("render"),
                                   "sampling_params": {"max_tokens": body.get("max_tokens")}}],
                                 headers=hdrs)

    async def tokenize(req: web.Request):
        bump(req)
        body = await read_body(req)
        ids = fake_tokens(prompt_text(body))
        return web.json_response({"count": len(ids), "max_model_len": 32768, "tokens": ids,
                                  "token_strs": None}, headers=hdrs)

    async def generate(req: web.Request):
        st["other"] += 1
        await read_body(req)
        if cfg["delay"]:
            await asyncio.sleep(cfg["delay"])
        return web.json_response({"text": "".join(TEXT_TOKENS[:ntok]),
                                  "meta_info": {"id": nid("gen"), "finish_reason": {"type": "length"},
                                                "prompt_tokens": 8, "completion_tokens": ntok}},
                                 headers=hdrs)

    async def stub_stats(_req):
        return web.json_response({**stats[port], "h2_probes_rejected": H2_PROBES["n"],
                                  "delay_ms": cfg["delay"] * 1000.0,
                                  "itl_ms": cfg["itl"] * 1000.0}, headers=hdrs)

    async def stub_config(req: web.Request):
        body = await read_body(req)
        if "delay_ms" in body:
            cfg["delay"] = max(0.0, float(body["delay_ms"])) / 1000.0
        if "itl_ms" in body:
            cfg["itl"] = max(0.0, float(body["itl_ms"])) / 1000.0
        return web.json_response({"delay_ms": cfg["delay"] * 1000.0, "itl_ms": cfg["itl"] * 1000.0},
                                 headers=hdrs)

    async def unknown(req: web.Request):
        st["unknown"] += 1
        if args.log_unknown:
            print(f"[stub {port}] UNKNOWN {req.method} {req.path_qs}", file=sys.stderr, flush=True)
        return web.json_response({"error": f"stub: no route {req.method} {req.path}"},
                                 status=404, headers=hdrs)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    r = app.router
    for p in ("/health", "/health_generate", "/ping"):
        r.add_get(p, ok)
    r.add_get("/v1/models", models)
    r.add_get("/metrics", metrics)
    for p in ("/get_model_info", "/model_info"):
        r.add_get(p, model_info)
    for p in ("/get_server_info", "/server_info"):
        r.add_get(p, server_info)
    r.add_get("/version", version)
    r.add_get("/get_load", get_load)
    r.add_post("/flush_cache", ok)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat)
    r.add_post("/generate", generate)
    if not args.no_render:
        r.add_post("/v1/completions/render", render)
        r.add_post("/v1/chat/completions/render", render)
        r.add_post("/tokenize", tokenize)
    r.add_get("/stub/stats", stub_stats)
    r.add_post("/stub/config", stub_config)
    r.add_route("*", "/{tail:.*}", unknown)
    return app


async def main_async(args):
    stats: dict = {}
    cfg = {"delay": args.delay_ms / 1000.0, "itl": args.itl_ms / 1000.0}
    runners = []
    for port in args.ports:
        app = build_app(port, args, stats, cfg)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, args.host, port, backlog=1024)
        await site.start()
        runners.append(runner)
    print(f"[stub] serving ports {args.ports} on {args.host} delay_ms={args.delay_ms} "
          f"tokens={args.tokens}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.max_lifetime_s > 0:
            await asyncio.wait_for(stop.wait(), timeout=args.max_lifetime_s)
        else:
            await stop.wait()
    except asyncio.TimeoutError:
        print("[stub] max lifetime reached, exiting", file=sys.stderr, flush=True)
    for runner in runners:
        await runner.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ports", type=int, nargs="+", default=[18001])
    ap.add_argument("--delay-ms", type=float, default=0.0, help="fixed delay before answering")
    ap.add_argument("--itl-ms", type=float, default=0.0, help="delay between streamed chunks")
    ap.add_argument("--tokens", type=int, default=4, help="completion length in chunks/tokens")
    ap.add_argument("--model", default="stub-model")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--no-render", action="store_true",
                    help="do not serve /v1/completions/render and /tokenize (vllm-router then "
                         "falls back to routing on raw text)")
    ap.add_argument("--quiet-unknown", dest="log_unknown", action="store_false",
                    help="do not log requests to unknown paths")
    ap.add_argument("--max-lifetime-s", type=float, default=3600.0,
                    help="exit by itself after this many seconds (0 = never)")
    args = ap.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.run(main_async(args))
            return
        except ImportError:
            pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
