"""Prometheus metrics of one router replica (``GET /metrics``), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
_ERROR_BUCKETS = (-1.0, -0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class RouterMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.decisions = Counter("block_router_decisions", "Routing decisions",
                                 ["policy", "instance"], registry=r)
        self.decision_seconds = Histogram(
            "block_router_decision_seconds", "Time to pick an instance (after tokenisation)",
            ["policy"], buckets=_DECISION_BUCKETS, registry=r)
        self.tokenize_seconds = Histogram(
            "block_router_tokenize_seconds", "Time to tokenise a prompt",
            buckets=_DECISION_BUCKETS, registry=r)
        self.requests = Counter("block_router_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.retries = Counter("block_router_retries", "Requests re-sent to another instance "
                               "after a failure before any byte", ["instance"], registry=r)
        self.rejected_slo = Counter("block_router_slo_rejections",
                                    "Requests refused with 429 by SLO admission", registry=r)
        self.slo_queued_seconds = Histogram("block_router_slo_queue_seconds",
                                            "Time requests waited at the router for SLO admission",
                                            registry=r)
        self.prefix_hit_tokens = Counter("block_router_prefix_hit_tokens",
                                         "Prompt tokens predicted cached on the chosen instance",
                                         registry=r)
        self.prompt_tokens = Counter("block_router_prompt_tokens", "Prompt tokens routed",
                                     registry=r)
        self.ttft_relative_error = Histogram(
            "block_router_ttft_relative_error",
            "(predicted - observed) / observed TTFT at the router", buckets=_ERROR_BUCKETS,
            registry=r)
        self.e2e_relative_error = Histogram(
            "block_router_e2e_relative_error",
            "(predicted - observed) / observed end-to-end latency at the router",
            buckets=_ERROR_BUCKETS, registry=r)
        self.in_flight = Gauge("block_router_in_flight", "Requests in flight per instance",
                               ["instance"], registry=r)
        self.instance_healthy = Gauge("block_router_instance_healthy",
                                      "1 if the instance is in rotation", ["instance"], registry=r)
        self.instance_stale = Gauge("block_router_instance_stale",
                                    "1 if the instance's block_sgl stream is stale",
                                    ["instance"], registry=r)
        self.stale_decisions = Counter("block_router_stale_decisions",
                                       "Decisions made while at least one instance was stale",
                                       registry=r)
        self.headroom = Gauge("block_router_provisioning_headroom",
                              "Predicted headroom (1 - best probe TTFT / SLO, or 1 - mean KV use)",
                              registry=r)
        self.recommendation = Gauge("block_router_provisioning_recommendation",
                                    "Scale recommendation: -1 scale in, 0 hold, 1 scale out",
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
