"""Adapter slots in kv_aware, driven through the plain Router: vLLM runs at most `--max-loras` distinct
adapters in a batch, so a request whose adapter would be one too many on a backend waits there until
one adapter's last request ends. kv_aware prices that wait (Backend.lora_slot_wait)."""
from __future__ import annotations

from proxy.backends.registry import Backend, InFlight
from proxy.backends.registry import now as clock
from proxy.routing.adapters import AdapterCard

from .test_policies import BACKENDS, doc_tokens, setup_router

BASE = "meta-llama/Llama-2-13b-hf"
ADAPTERS = ("sql", "chat", "math")


def serve_adapters(r, max_loras: int | None = 2) -> None:
    for b in r.registry:
        b.models = [BASE, *ADAPTERS]
        b.adapters = {a: AdapterCard(a, f"/adapters/{a}", BASE) for a in ADAPTERS}
        b.scraped.max_loras = max_loras


def begin(r, model: str, doc: int, url: str | None = None, max_tokens: int = 200):
    """Route one adapter request (to `url` if given) and keep it in flight."""
    ctx = r.context(doc_tokens(doc, 64), max_tokens, model=model)
    d = r.decide(ctx)
    if url is not None:
        d.backend = r.registry.get(url)
    return d, r.begin(ctx, d)


def test_a_backend_whose_slots_other_adapters_hold_is_passed_over_for_one_with_a_free_slot():
    a, b = BACKENDS[:2]
    picks = {}
    for weight in (1.0, 0.0):  # the default, and the term switched off
        r = setup_router(n=2)
        r.policies["kv_aware"].lora_slot_weight = weight
        serve_adapters(r, max_loras=2)
        # Long requests: "sql" and "chat" on a hold its two slots; b, busier, runs only "sql".
        begin(r, "sql", 1, a)
        begin(r, "chat", 2, a)
        for doc in (3, 5, 6):
            begin(r, "sql", doc, b)
        assert r.registry.get(a).loras == {"sql": 1, "chat": 1} and r.registry.get(b).loras == {"sql": 3}
        picks[weight] = begin(r, "math", 4)[0].backend.url  # a third adapter on a would wait
    assert picks == {1.0: b, 0.0: a}, picks  # the slot term, not load, sent it to the busier b


def test_an_adapter_already_running_on_a_full_backend_waits_for_nothing():
    r = setup_router(n=2)
    serve_adapters(r, max_loras=2)
    a = r.registry.get(BACKENDS[0])
    begin(r, "sql", 1, a.url)
    begin(r, "chat", 2, a.url)
    t = clock()
    assert a.lora_slot_wait("sql", t, 2) == 0.0  # it runs already: no new slot needed
    assert a.lora_slot_wait("math", t, 3) == 0.0  # a third slot is free
    assert a.lora_slot_wait("math", t, None) == 0.0  # unknown slots: nothing charged
    assert a.lora_slot_wait("math", t, 2) > 0.0


def test_the_wait_is_until_one_adapters_last_request_ends_and_the_counts_return_to_zero():
    b = Backend("http://x")
    t = clock()

    def rec(i: int, lora: str | None, decode_wall: float) -> InFlight:
        return InFlight(i, b, 4, 4, 100, 0.01, t, t, decode_wall=decode_wall, lora=lora)

    recs = [rec(1, "sql", 5.0), rec(2, "sql", 1.0), rec(3, "chat", 3.0), rec(4, None, 0.5)]
    for r in recs:
        b.add(r)
        b.started(r, t)
    assert b.loras == {"sql": 2, "chat": 1}
    # sql's slot frees when its later request ends (5 s), chat's at 3 s: the first free slot is chat's.
    assert abs(b.lora_slot_wait("math", t, 2) - 3.0) < 1e-9
    b.remove(recs[2])
    assert b.loras == {"sql": 2} and b.lora_slot_wait("math", t, 2) == 0.0
    for r in recs:
        b.remove(r)
    assert b.loras == {} and b.in_flight == 0
