"""Prometheus metrics under vLLM's names, so dashboards built for vLLM work unchanged.

Engine-wide gauges and counters are read from EngineStats at scrape time (one source of
truth, nothing to keep in sync); per-request histograms are observed when a request ends.
Each app gets its own CollectorRegistry so several apps can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, get_stats: Callable[[], object | None], model_name: str):
        self._get_stats = get_stats
        self._labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def collect(self) -> Iterator:
        s = self._get_stats()
        if s is None:  # model still loading
            return
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", s.kv_usage)
        # The older name, still read by many dashboards.
        yield self._gauge("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full).", s.kv_usage)
        yield self._counter("vllm:num_preemptions", "Preemptions (recompute).", s.num_preemptions)
        yield self._counter("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            s.prefix_cache_hits)
        if s.spec_accepted_per_pos:  # speculative decoding is on
            yield self._counter("vllm:spec_decode_num_drafts", "Verify steps that had drafts.", s.spec_num_drafts)
            yield self._counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                s.spec_num_draft_tokens)
            yield self._counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                s.spec_num_accepted_tokens)
            per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Draft tokens accepted at each draft position.",
                                          labels=[*self._labels, "position"])
            for i, n in enumerate(s.spec_accepted_per_pos):
                per_pos.add_metric([*self._labels.values(), str(i)], n)
            yield per_pos


class ServerMetrics:
    def __init__(self, get_stats: Callable[[], object | None], model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(get_stats, model_name))
        labels = ["model_name"]
        self._model = model_name

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Time per output token after the first.",
                         _TPOT_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time from arrival to first schedule.",
                          _LATENCY_BUCKETS)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one finished request: latencies once per request, and one success count per
        completion (n > 1 finishes n sequences, possibly for different reasons)."""
        m = out.metrics
        if m is not None:
            if m.first_token_time is not None:
                self.ttft.labels(self._model).observe(m.first_token_time - m.arrival_time)
            if m.scheduled_time is not None:
                self.queue.labels(self._model).observe(m.scheduled_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.labels(self._model).observe(m.finished_time - m.arrival_time)
                decoded = max(len(c.token_ids) for c in out.outputs) - 1 if out.outputs else 0
                if m.first_token_time is not None and decoded > 0:
                    self.tpot.labels(self._model).observe((m.finished_time - m.first_token_time) / decoded)
        for c in out.outputs:
            if c.finish_reason is not None:
                self.success.labels(self._model, c.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
