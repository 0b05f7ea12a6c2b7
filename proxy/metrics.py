"""The proxy's own Prometheus metrics, in a registry per proxy (several proxies can share a process).

Per-backend gauges (in-flight, health, indexed blocks) are read from the registry at scrape time
by a collector, so the request path does no gauge bookkeeping.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .edge.admission import Admission
from .backends.circuit_breaker import BreakerState
from .routing.router import Router
from .index.exact_audit import AUDIT_REASONS

# Doubling from 10 s up to the 600 s idle timeout, so long streams are not lumped into one 160-640 s bucket.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _BackendCollector(Collector):
    def __init__(self, router: Router, admission: Admission | None) -> None:
        self.router = router
        self.admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("kvroute_backend_in_flight", "Requests routed to the backend and not finished", labels=["backend"])
        healthy = GaugeMetricFamily("kvroute_backend_healthy", "1 when the backend receives traffic", labels=["backend"])
        blocks = GaugeMetricFamily("kvroute_backend_indexed_blocks", "Blocks the prefix index believes the backend caches", labels=["backend"])
        for b in self.router.registry:
            in_flight.add_metric([b.url], b.in_flight)
            healthy.add_metric([b.url], 1.0 if b.healthy else 0.0)
            blocks.add_metric([b.url], self.router.index.num_blocks(b.url))
        yield in_flight
        yield healthy
        yield blocks
        yield from self._breakers()
        if self.admission is not None:
            a = self.admission
            yield GaugeMetricFamily("kvroute_requests_in_flight", "Client requests accepted and not yet answered", value=a.in_flight)
            yield GaugeMetricFamily("kvroute_api_keys_in_flight", "API keys with at least one request in flight", value=len(a.per_key))
        yield from self._kv_events()
        yield from self._replicas()

    def _replicas(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Peer replicas followed and lost (a lost one: routing goes on with what this replica knows)."""
        sync = self.router.replicas
        if sync is None:
            return
        lost = len(sync.lost)
        peers = GaugeMetricFamily("kvroute_replica_peers", "Peer replicas by state (synced: its routing facts are applied; "
                                  "lost: routing goes on without them)", labels=["state"])
        peers.add_metric(["synced"], len(sync.peers) - lost)
        peers.add_metric(["lost"], lost)
        yield peers
        desync = CounterMetricFamily("kvroute_replica_desync", "Times a peer replica's stream was lost (gap, restart, "
                                     "undecodable, silence, disconnect)", labels=["peer", "reason"])
        for (peer, reason), n in sync.desync_counts().items():
            desync.add_metric([peer, reason], n)
        yield desync
        yield CounterMetricFamily("kvroute_replica_facts_published", "Routing facts this replica published", value=sync.published_facts)
        yield CounterMetricFamily("kvroute_replica_facts_applied", "Routing facts applied from peer replicas", value=sync.applied_facts)

    def _breakers(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "kvroute_backend_circuit_state", "1 for the backend's circuit-breaker state (closed, open or half_open)",
            labels=["backend", "state"],
        )
        opened = CounterMetricFamily("kvroute_backend_circuit_opened", "Times the backend's circuit breaker opened", labels=["backend"])
        for b in self.router.registry:
            for st in BreakerState:
                state.add_metric([b.url, st.value], 1.0 if b.breaker.state is st else 0.0)
            opened.add_metric([b.url], b.breaker.times_opened)
        yield state
        yield opened

    def _kv_events(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per backend: which index mode routing uses (exact = fed by its KV events) and desyncs by reason."""
        follower = self.router.kv_events
        mode = GaugeMetricFamily(
            "kvroute_backend_index_mode", "1 for the prefix-index mode in use for the backend (exact or approximate)",
            labels=["backend", "mode"],
        )
        for b in self.router.registry:
            current = follower.mode(b.url)
            for m in ("exact", "approximate"):
                mode.add_metric([b.url, m], 1.0 if m == current else 0.0)
        desync = CounterMetricFamily(
            "kvroute_kv_events_desync", "Times a backend's KV-event stream was lost (gap, restart, undecodable, silence, disconnect)",
            labels=["backend", "reason"],
        )
        for url, sub in follower.subscribers.items():
            for reason, n in sub.stats.desyncs.items():
                desync.add_metric([url, reason], n)
        untrusted = GaugeMetricFamily(
            "kvroute_exact_view_untrusted",
            "1 while an event-fed backend is routed on the approximate index because its answers or prefix-cache "
            "counters contradict its KV events (reason: cached_tokens_missed or no_events_while_computing)",
            labels=["backend", "reason"],
        )
        audit = self.router.exact_audit
        for url in follower.subscribers:
            st = audit.states.get(url)
            for reason in AUDIT_REASONS:
                untrusted.add_metric([url, reason], 1.0 if st is not None and st.reason == reason else 0.0)
        yield mode
        yield desync
        yield untrusted


class ProxyMetrics:
    def __init__(self, router: Router, admission: Admission | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._children: dict = {}
        r = self.registry
        # `model`: the request's model (a base model or adapter some backend serves; "" when unnamed or unknown).
        self.requests = Counter("kvroute_requests", "Proxied requests", ["strategy", "backend", "status", "model"], registry=r)
        self.latency = Histogram("kvroute_request_latency_seconds", "Request latency through the proxy", ["strategy", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kvroute_ttft_seconds", "Time until the answer starts: first streamed chunk, or the whole body when not streaming", ["strategy", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.matched = Histogram("kvroute_matched_blocks", "Prefix blocks the chosen backend was believed to hold", ["strategy", "model"], buckets=BLOCK_BUCKETS, registry=r)
        self.retries = Counter("kvroute_retries", "Requests retried on another backend", ["reason"], registry=r)
        self.errors = Counter("kvroute_rejected", "OpenAI requests answered with an error by the proxy itself (admin API errors not counted)", ["status"], registry=r)
        self.auth_failures = Counter(
            "kvroute_backend_auth_failures", "Requests a backend refused for the proxy's credentials (401/403; not retried)",
            ["backend"], registry=r)
        self.token_mismatch = Counter(
            "kvroute_prompt_tokens_mismatch",
            "Responses whose usage.prompt_tokens differs from the proxy's own token count (its tokenizer does not match the backend's)",
            ["backend"], registry=r)
        self.malformed = Counter(
            "kvroute_upstream_malformed", "Backend answers dropped (connection closed) for broken HTTP framing or a bound",
            ["backend"], registry=r,
        )
        self.bad_values = Counter(
            "kvroute_backend_bad_values",
            "Values in a backend's answers the proxy could not use (absurd or malformed) and ignored; each field logged once",
            ["backend", "field"], registry=r)
        self.relay_errors = Counter(
            "kvroute_relay_errors", "Answers ended early by an error in the proxy itself after their first byte", ["kind"],
            registry=r)
        r.register(_BackendCollector(router, admission))

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, memoised: the request path skips prometheus_client's label validation."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
