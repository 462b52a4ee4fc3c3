"""The router's Prometheus metrics: requests, latency and errors per replica and version,
decisions by reason, predicted vs actual cached tokens, retries, failovers, rollout state.
Replica gauges are read at scrape time from the replica set (one source of truth)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], tuple[list, dict]]):
        self._read = read  # () -> (replicas, rollout snapshot)

    def collect(self) -> Iterator:
        replicas, rollout = self._read()
        fams = {name: GaugeMetricFamily(f"tokenmill_router_replica_{name}", doc, labels=["replica", "version"])
                for name, doc in (("healthy", "1 when the last health check passed."),
                                  ("draining", "1 when it takes no new requests."),
                                  ("in_flight", "Requests this router has open on it."),
                                  ("pending_blocks", "Predicted uncached blocks of its requests still in prefill."),
                                  ("waiting", "Its engine's waiting queue (last scrape)."),
                                  ("kv_usage", "Its KV cache usage (last scrape)."),
                                  ("index_blocks", "Block hashes in its predicted-cache index."))}
        for r in replicas:
            labels = [r.url, r.version]
            fams["healthy"].add_metric(labels, float(r.healthy))
            fams["draining"].add_metric(labels, float(r.draining or r.server_draining))
            fams["in_flight"].add_metric(labels, r.in_flight)
            fams["pending_blocks"].add_metric(labels, r.pending_blocks)
            fams["waiting"].add_metric(labels, r.waiting)
            fams["kv_usage"].add_metric(labels, r.kv_usage)
            fams["index_blocks"].add_metric(labels, len(r.index))
        yield from fams.values()
        share = GaugeMetricFamily("tokenmill_router_canary_percent", "The canary's traffic share.",
                                  labels=["stable", "canary", "state"])
        share.add_metric([rollout["stable"], rollout["canary"] or "", rollout["state"]], rollout["percent"])
        yield share


class RouterMetrics:
    def __init__(self, read_state: Callable[[], tuple[list, dict]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenmill_router_requests", "Requests answered, by replica, version and outcome.",
                                ["replica", "version", "outcome"], registry=r)
        self.ttft = Histogram("tokenmill_router_ttft_seconds", "Time to the first streamed byte.",
                              ["version"], buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill_router_request_seconds", "Request latency, end to end.",
                             ["replica", "version"], buckets=_E2E_BUCKETS, registry=r)
        self.decisions = Counter("tokenmill_router_decisions", "Routing decisions by reason.", ["reason"], registry=r)
        self.predicted = Counter("tokenmill_router_predicted_cached_tokens",
                                 "Prompt tokens predicted cached (requests whose actual is known).",
                                 ["replica"], registry=r)
        self.actual = Counter("tokenmill_router_actual_cached_tokens",
                              "Prompt tokens the replica reported cached (usage.prompt_tokens_details).",
                              ["replica"], registry=r)
        self.prompt_tokens = Counter("tokenmill_router_prompt_tokens", "Prompt tokens (requests with usage).",
                                     ["replica"], registry=r)
        self.prediction_error = Histogram("tokenmill_router_prediction_error_tokens",
                                          "|predicted - actual| cached tokens per request.", ["replica"],
                                          buckets=(0, 16, 64, 256, 1024, 4096), registry=r)
        self.retries = Counter("tokenmill_router_retries", "Attempts moved to another replica before any byte "
                               "reached the client.", registry=r)
        self.failovers = Counter("tokenmill_router_stream_failures",
                                 "Streams cut by a replica failing after the first byte (ended with an error event).",
                                 ["replica"], registry=r)
        self.rollout_events = Counter("tokenmill_router_rollout_events", "Rollout moves by action.",
                                      ["action"], registry=r)
        self.registry.register(_StateCollector(read_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
