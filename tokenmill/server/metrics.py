"""Prometheus metrics under vLLM's names, so dashboards built for vLLM work unchanged.

Every sample carries a `model_name` label, as vLLM's do, so one server may serve several
models and a dashboard tells them apart. Engine-wide gauges and counters are read from each
engine's stats at scrape time (one source of truth, nothing to keep in sync); per-request
histograms are observed when a request ends. Each app gets its own CollectorRegistry so
several apps can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)

# (family type, name, help, what to read from EngineStats)
_GAUGE, _COUNTER = GaugeMetricFamily, CounterMetricFamily
_ENGINE_METRICS = (
    (_GAUGE, "vllm:num_requests_running", "Requests in the running batch.", lambda s: s.num_running),
    (_GAUGE, "vllm:num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting),
    (_GAUGE, "vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", lambda s: s.kv_usage),
    # The older name, still read by many dashboards.
    (_GAUGE, "vllm:gpu_cache_usage_perc", "KV cache usage (1 = full).", lambda s: s.kv_usage),
    (_COUNTER, "vllm:num_preemptions", "Preemptions (recompute).", lambda s: s.num_preemptions),
    (_COUNTER, "vllm:prompt_tokens", "Prefill tokens processed.", lambda s: s.prompt_tokens_total),
    (_COUNTER, "vllm:generation_tokens", "Tokens generated.", lambda s: s.generation_tokens_total),
    (_COUNTER, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     lambda s: s.prefix_cache_queries),
    (_COUNTER, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", lambda s: s.prefix_cache_hits),
    # No vLLM name: vLLM counts nothing with caching off. This says what turning it on would save.
    (_COUNTER, "tokenmill:prefix_cache_missed_hits",
     "With prefix caching off: prompt tokens a recent request had already computed.",
     lambda s: s.prefix_cache_missed_hits),
)
# Only for the engines that speculate.
_SPEC_METRICS = (
    (_COUNTER, "vllm:spec_decode_num_drafts", "Verify steps that had drafts.", lambda s: s.spec_num_drafts),
    (_COUNTER, "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", lambda s: s.spec_num_draft_tokens),
    (_COUNTER, "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
     lambda s: s.spec_num_accepted_tokens),
)


class _EngineCollector(Collector):
    """The engines' own gauges and counters, one sample per model. One collector for all
    engines rather than one each: the exposition format wants all samples of a metric under
    a single HELP/TYPE header, which separate collectors would each repeat."""

    def __init__(self, get_stats: Callable[[], Mapping[str, object]]):
        self._get_stats = get_stats  # model name -> EngineStats, for the engines loaded so far

    def collect(self) -> Iterator:
        stats = dict(self._get_stats())
        if not stats:  # every model still loading
            return
        yield from self._families(_ENGINE_METRICS, stats)
        speculating = {model: s for model, s in stats.items() if s.spec_accepted_per_pos}
        if not speculating:
            return
        yield from self._families(_SPEC_METRICS, speculating)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted at each draft position.",
                                      labels=["model_name", "position"])
        for model, s in speculating.items():
            for i, n in enumerate(s.spec_accepted_per_pos):
                per_pos.add_metric([model, str(i)], n)
        yield per_pos

    @staticmethod
    def _families(table, stats: Mapping[str, object]) -> Iterator:
        for kind, name, doc, read in table:
            family = kind(name, doc, labels=["model_name"])
            for model, s in stats.items():
                family.add_metric([model], read(s))
            yield family


@dataclass
class ModelMetrics:
    """The per-request histograms and counters of one served model (its label bound)."""

    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    queue: Histogram
    success: Counter
    model_name: str

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one finished request: latencies once per request, and one success count per
        completion (n > 1 finishes n sequences, possibly for different reasons)."""
        m = out.metrics
        if m is not None:
            if m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.scheduled_time is not None:
                self.queue.observe(m.scheduled_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
                decoded = max(len(c.token_ids) for c in out.outputs) - 1 if out.outputs else 0
                if m.first_token_time is not None and decoded > 0:
                    self.tpot.observe((m.finished_time - m.first_token_time) / decoded)
        for c in out.outputs:
            if c.finish_reason is not None:
                self.success.labels(self.model_name, c.finish_reason).inc()


class ServerMetrics:
    """The app's registry: engine stats for every loaded model, and each model's histograms."""

    def __init__(self, get_stats: Callable[[], Mapping[str, object]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(get_stats))

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)

        self._ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self._tpot = hist("vllm:time_per_output_token_seconds", "Time per output token after the first.",
                          _TPOT_BUCKETS)
        self._e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self._queue = hist("vllm:request_queue_time_seconds", "Time from arrival to first schedule.",
                           _LATENCY_BUCKETS)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)

    def for_model(self, model_name: str) -> ModelMetrics:
        return ModelMetrics(
            ttft=self._ttft.labels(model_name), tpot=self._tpot.labels(model_name),
            e2e=self._e2e.labels(model_name), queue=self._queue.labels(model_name),
            success=self._success, model_name=model_name,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
