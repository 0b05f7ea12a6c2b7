"""The vLLM-compatible HTTP API of one emulator (aiohttp), and helpers to start emulators in-process.

Handlers are thin: `protocol` validates, the engine generates, `responses` shapes JSON/SSE.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import orjson

from aiohttp import web

from kvblocks import APIError, Tokenizer, error_body, get_tokenizer
from kvblocks.logs import get_logger

from .config import EmulatorConfig
from .engine import Engine, make_engine
from .faults import NO_FAULT, FaultInjector, FaultPlan, make_injector
from kvblocks.http_errors import JSONErrorAppRunner, json_response
from .kv_events import EventPublisher, attach_publisher, replica_kv_events_config
from .logs import request_log_fields
from .lora import LoraRegistry
from .metrics import CONTENT_TYPE, EngineMetrics
from .protocol import GenerateRequest, RequestParser, parse_json_object
from .logprobs import DummyLogprobs
from .request import EngineRequest, SamplingParams, TokenOutput
from .responses import ResponseBuilder

log = get_logger("emulator")

SSE_DONE = b"data: [DONE]\n\n"
MAX_REQUEST_ID = 256


@dataclass
class EmulatorState:
    """What handlers share: configuration, the engine, its metrics and the request parser."""

    config: EmulatorConfig
    engine: Engine
    metrics: EngineMetrics
    parser: RequestParser
    tokenizer: Tokenizer
    created: int
    ids: itertools.count
    faults: FaultInjector
    stopping: asyncio.Event
    logprobs: DummyLogprobs
    fingerprint: str
    lora: LoraRegistry
    kv_events: EventPublisher | None = None


STATE = web.AppKey("emulator_state", EmulatorState)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure leaves as vLLM's error JSON: APIError as given, HTTP errors mapped, others 500."""
    try:
        return await handler(request)
    except APIError as e:
        return json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_response(error_body(e.status, e.reason), status=e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug must still answer with JSON, never a trace
        log.exception("unhandled error", path=request.path)
        return json_response(error_body(500, f"internal error: {type(e).__name__}"), status=500)


def create_app(config: EmulatorConfig, tokenizer: Tokenizer | None = None) -> web.Application:
    """One emulated vLLM server: its own engine, block pool and metrics registry."""
    tokenizer = tokenizer or get_tokenizer()
    metrics = EngineMetrics(config)
    engine = make_engine(config, tokenizer, metrics)
    metrics.bind(engine)
    lora = LoraRegistry(config.model, config.lora_modules, config.max_loras)
    state = EmulatorState(
        config=config,
        engine=engine,
        metrics=metrics,
        parser=RequestParser(config.model, tokenizer, config.max_model_len, lora.adapters,
                             tuple(config.served_model_aliases)),
        tokenizer=tokenizer,
        created=int(time.time()),
        ids=itertools.count(),
        faults=make_injector(config),
        stopping=asyncio.Event(),
        logprobs=DummyLogprobs(tokenizer),
        fingerprint=system_fingerprint(config),
        lora=lora,
    )
    if config.log_requests:
        engine.finish_listeners.append(lambda req: log.info("request finished", **request_log_fields(req)))
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    if config.enable_lora or config.lora_modules:
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.on_shutdown.append(_abort_in_flight)
    state.kv_events = attach_publisher(engine, config.kv_events_config)
    if state.kv_events is not None:
        app.on_cleanup.append(_close_kv_events)
    return app


async def _close_kv_events(app: web.Application) -> None:
    app[STATE].kv_events.close()


async def _abort_in_flight(app: web.Application) -> None:
    app[STATE].stopping.set()
    app[STATE].engine.abort_all()


# --- generation ------------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    g = st.parser.completion(parse_json_object(await request.read()))
    return await _generate(request, st, g)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    g = st.parser.chat(parse_json_object(await request.read()))
    return await _generate(request, st, g)


async def _generate(request: web.Request, st: EmulatorState, g: GenerateRequest) -> web.StreamResponse:
    rid = _plain_id(request.headers.get("X-Request-ID")) or _plain_id(g.request_id) or uuid.uuid4().hex
    if g.unknown_fields:
        log.info("ignoring unknown request fields", request_id=rid, fields=g.unknown_fields)
    plan = st.faults.plan() if st.faults.enabled else NO_FAULT
    if not plan.clean:
        early = await _fault_before_first_byte(request, st, plan, rid)
        if early is not None:
            return early
    k = next(st.ids)
    adapter = st.lora.get(g.model)
    ereqs = [
        st.engine.make_request(f"{rid}-{i * g.n + j}-{k}", prompt, _sample_params(g.params, j), g.cache_salt,
                               client_request_id=rid, lora=adapter)
        for i, prompt in enumerate(g.prompts) for j in range(g.n)
    ]
    rb = ResponseBuilder(g, rid, int(time.time()), st.config.enable_prompt_tokens_details, st.logprobs,
                         st.engine.block_size, st.fingerprint)
    headers = {"X-Request-ID": rid}
    if plan.cut_after is not None:
        return await _generate_and_cut(request, st, ereqs, rb, headers, g.stream, plan.cut_after, rid, g.include_usage)
    if not g.stream:
        results = await asyncio.gather(*(_collect(st.engine, er) for er in ereqs))
        return json_response(rb.full_response(results), headers=headers)
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        if len(ereqs) == 1:  # the common case, without the merging layer on the per-token path
            async with contextlib.aclosing(st.engine.generate(ereqs[0])) as outputs:
                async for out in outputs:
                    chunk = rb.stream_chunk(0, out)
                    if chunk is not None:
                        await resp.write(chunk)
        else:
            async with contextlib.aclosing(_outputs(st.engine, ereqs)) as merged:
                async for i, out in merged:
                    chunk = rb.stream_chunk(i, out)
                    if chunk is not None:
                        await resp.write(chunk)
        tail = rb.usage_chunk() if g.include_usage else b""
        await resp.write(tail + SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        log.info("client disconnected", request_id=rid)
    return resp


def system_fingerprint(config: EmulatorConfig) -> str:
    """vLLM's default ("full") system_fingerprint: vllm-<version>-<8 hex of the config's hash>."""
    digest = hashlib.sha256(orjson.dumps(config.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"vllm-{config.version}-{digest[:8]}"


def _sample_params(params: SamplingParams, j: int) -> SamplingParams:
    """Sample j of n > 1 (vLLM's ParentRequest): its own seed (seed + j), so samples differ; all are
    added in one tick, so the first to be scheduled caches the prompt and the others hit it."""
    if j == 0:
        return params
    return replace(params, seed=(params.seed + j) if params.seed is not None else -j)


def _plain_id(rid: str | None) -> str | None:
    """A client-chosen request id if it can go back in a header and a JSON id (printable ASCII), else None."""
    if rid and len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable():
        return rid
    return None


async def _fault_before_first_byte(
    request: web.Request, st: EmulatorState, plan: FaultPlan, rid: str
) -> web.StreamResponse | None:
    """Carry out the part of a fault plan that happens before any engine work; a response ends the request."""
    if plan.crash:
        log.warning("injected fault: crash", request_id=rid, after_requests=st.faults.config.crash_after)
        if st.faults.crash is not None:
            st.faults.crash()
        raise ConnectionResetError("injected crash")
    if plan.error_status is not None:
        log.info("injected fault: error", request_id=rid, status=plan.error_status)
        return json_response(error_body(plan.error_status, "injected fault: the server is temporarily unavailable"),
                     status=plan.error_status, headers={"X-Request-ID": rid})
    if plan.hang:
        log.info("injected fault: hang", request_id=rid)
        st.faults.hanging += 1
        try:
            await st.stopping.wait()  # until the client gives up (the handler is cancelled) or shutdown
        finally:
            st.faults.hanging -= 1
        raise APIError(503, "server shutting down")
    if plan.delay:
        log.info("injected fault: latency spike", request_id=rid, seconds=plan.delay)
        await asyncio.sleep(plan.delay)
    return None


async def _generate_and_cut(
    request: web.Request, st: EmulatorState, ereqs: list[EngineRequest], rb: ResponseBuilder,
    headers: dict[str, str], stream: bool, cut_after: int, rid: str, include_usage: bool,
) -> web.StreamResponse:
    """Generate; after `cut_after` tokens drop the connection (no [DONE], no body). Shorter answers complete."""
    resp: web.StreamResponse | None = None
    if stream:
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
    results: list[list[TokenOutput]] = [[] for _ in ereqs]
    remaining = len(ereqs)
    sent = 0
    async with contextlib.aclosing(_outputs(st.engine, ereqs)) as merged:  # closing it frees the engine's blocks
        while remaining and sent < cut_after:
            i, out = await anext(merged)
            results[i].append(out)
            sent += 1
            remaining -= out.finish_reason is not None
            chunk = rb.stream_chunk(i, out) if resp is not None else None
            if chunk is not None:
                await resp.write(chunk)
    if not remaining:
        if resp is None:
            return json_response(rb.full_response(results), headers=headers)
        await resp.write((rb.usage_chunk() if include_usage else b"") + SSE_DONE)
        await resp.write_eof()
        return resp
    log.info("injected fault: stream cut", request_id=rid, after_tokens=sent)
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("injected stream cut")


async def _collect(engine: Engine, er: EngineRequest) -> list[TokenOutput]:
    async with contextlib.aclosing(engine.generate(er)) as gen:
        return [out async for out in gen]


async def _outputs(engine: Engine, ereqs: list[EngineRequest]) -> AsyncIterator[tuple[int, TokenOutput]]:
    """(choice index, output) pairs as they are produced, merging several prompts' streams."""
    queue: asyncio.Queue[tuple[int, TokenOutput]] = asyncio.Queue()

    async def pump(i: int, er: EngineRequest) -> None:
        async with contextlib.aclosing(engine.generate(er)) as gen:
            async for out in gen:
                queue.put_nowait((i, out))

    tasks = [asyncio.create_task(pump(i, er)) for i, er in enumerate(ereqs)]
    try:
        remaining = len(ereqs)
        while remaining:
            i, out = await queue.get()
            yield i, out
            if out.finish_reason is not None:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the rest of vLLM's surface --------------------------------------------------------------
async def models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return json_response(model_list(st.config, st.lora, st.created))


def model_list(config: EmulatorConfig, lora: LoraRegistry, created: int) -> dict:
    """/v1/models: the base model (and its aliases), then each LoRA adapter with root = its path and
    parent = the base (vLLM's cards). The fleet simulator answers the proxy's monitor with it too."""
    m = config.model
    cards = [(name, m, None, config.max_model_len) for name in (m, *config.served_model_aliases)]
    cards += [(name, path, m, None) for name, path in lora.cards()]
    return {"object": "list", "data": [_model_card(created, *c) for c in cards]}


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's runtime adapter loading: {"lora_name", "lora_path", "load_inplace"?} -> plain-text success."""
    st = request.app[STATE]
    body = parse_json_object(await request.read())
    name, path = body.get("lora_name"), body.get("lora_path")
    st.lora.load(name if isinstance(name, str) else "", path if isinstance(path, str) else "",
                 in_place=body.get("load_inplace") is True)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    st = request.app[STATE]
    name = parse_json_object(await request.read()).get("lora_name")
    st.lora.unload(name if isinstance(name, str) else "")
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _model_card(created: int, model_id: str, root: str, parent: str | None, max_len: int | None) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
        "permission": [{
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }],
    }


async def health(request: web.Request) -> web.Response:
    if not request.app[STATE].faults.health_ok():
        return json_response(error_body(503, "server is starting"), status=503)
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    # vLLM's body plus what a load generator needs to read emulated time right (absent on real vLLM).
    config = request.app[STATE].config
    return json_response({"version": config.version, "kvroute_emulator": {"time_scale": config.time_scale}})


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def tokenize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    t = st.parser.tokenize(parse_json_object(await request.read()))
    out: dict[str, object] = {"count": len(t.tokens), "max_model_len": st.config.max_model_len, "tokens": t.tokens}
    if t.return_token_strs:
        out["token_strs"] = [st.tokenizer.decode([tok]) for tok in t.tokens]
    return json_response(out)


async def detokenize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    d = st.parser.detokenize(parse_json_object(await request.read()))
    return json_response({"prompt": st.tokenizer.decode(d.tokens)})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    """Like vLLM 0.32 (dev API): 200 {"success": bool}; the reset fails while requests hold blocks
    unless ?reset_running_requests=true, which preempts them first (they recompute)."""
    st = request.app[STATE]
    reset_running = _query_bool(request, "reset_running_requests")
    _query_bool(request, "reset_external")  # no connector: nothing external to reset
    log.info("Resetting prefix cache...")
    ok = st.engine.reset_prefix_cache(reset_running_requests=reset_running)
    return json_response({"success": bool(ok)})


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return False
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on", "t", "y"):
        return True
    if v in ("0", "false", "no", "off", "f", "n"):
        return False
    raise APIError(400, f"{name} must be a boolean, got {raw!r}", param=name)


# --- running emulators in-process ----------------------------------------------------------
@dataclass
class RunningEmulator:
    """A started emulator: where it listens and handles to its engine and app."""

    url: str
    port: int
    config: EmulatorConfig
    engine: Engine
    app: web.Application
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_emulator(config: EmulatorConfig, tokenizer: Tokenizer | None = None) -> RunningEmulator:
    """Start one emulator on the running event loop (port 0 = OS-assigned; the real port is reported)."""
    app = create_app(config, tokenizer)
    runner = JSONErrorAppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=2048)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    host = config.host if ":" not in config.host else f"[{config.host}]"
    app[STATE].faults.crash = lambda: _crash_in_process(runner, site, app[STATE].engine)
    return RunningEmulator(f"http://{host}:{port}", port, config, app[STATE].engine, app, runner)


def _crash_in_process(runner: web.AppRunner, site: web.TCPSite, engine: Engine) -> None:
    """What a process exit looks like from outside: the port stops listening, every connection drops."""
    server = site._server  # the asyncio server; closing it stops accepting
    if server is not None:
        server.close()
    if runner.server is not None:
        for conn in runner.server.connections:
            if conn.transport is not None:
                conn.transport.abort()
    engine.abort_all()


async def start_emulators(config: EmulatorConfig, n: int | None = None) -> list[RunningEmulator]:
    """Start `n` (default config.replicas) emulators on consecutive ports from config.port (all OS-assigned when 0)."""
    n = config.replicas if n is None else n
    started: list[RunningEmulator] = []
    try:
        for i in range(n):
            cfg = replace(
                config, port=config.port + i if config.port else 0, replicas=1,
                kv_events_config=replica_kv_events_config(config.kv_events_config, i),
            )
            started.append(await start_emulator(cfg))
    except BaseException:
        for em in started:
            await em.stop()
        raise
    return started
