"""Prometheus metrics of one gateway process (prometheus-client).

Each gateway owns a registry, so several gateways (or tests) in one process do
not collide. Fleet-wide numbers (queue depth, in-flight per worker) come from
Redis at scrape time, so any gateway reports the same truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("idlegrid_requests", "Requests answered, by route and status code", ["route", "status"], registry=r)
        self.ttft = Histogram("idlegrid_ttft_seconds", "Time to first token seen by clients", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("idlegrid_tpot_seconds", "Time per output token after the first", ["model"], buckets=_TPOT_BUCKETS, registry=r)
        self.tokens = Counter("idlegrid_tokens", "Tokens served", ["model", "kind"], registry=r)
        self.inflight = Gauge("idlegrid_worker_inflight_requests", "Requests reserved on each worker (all gateways)", ["worker", "center"], registry=r)
        self.queue_depth = Gauge("idlegrid_queue_depth", "Requests waiting for room", ["model", "center"], registry=r)
        self.workers = Gauge("idlegrid_workers", "Workers by state", ["state"], registry=r)
        self.retries = Counter("idlegrid_engine_retries", "Engines given up on before the first byte", ["reason"], registry=r)
        self.migrations = Counter("idlegrid_migrations", "Answers resumed on another engine mid-stream", ["reason"], registry=r)
