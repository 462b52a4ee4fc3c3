"""From a recording to evidence: per replica and model, the gauges over the window, the
counters' rates, and latency quantiles from the histograms' growth within the window (so a
replica's history before the window does not blur what it does now)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from tokenmill.doctor.recording import Recording, ReplicaRecording, Scrape


@dataclass
class Latency:
    """Quantiles (seconds) of one histogram's observations within the window."""

    count: float = 0.0
    p50: float | None = None
    p99: float | None = None


@dataclass
class ModelWindow:
    replica: str
    model: str
    seconds: float
    times: list[float]
    running: list[float]
    waiting: list[float]
    kv_usage: list[float]
    deltas: dict[str, float]  # counter name (without _total) -> growth over the window
    ttft: Latency = field(default_factory=Latency)
    queue: Latency = field(default_factory=Latency)
    tpot: Latency = field(default_factory=Latency)
    e2e: Latency = field(default_factory=Latency)
    limits: dict = field(default_factory=dict)

    # -- gauges ---------------------------------------------------------------------------
    @property
    def mean_running(self) -> float:
        return statistics.fmean(self.running) if self.running else 0.0

    @property
    def mean_waiting(self) -> float:
        return statistics.fmean(self.waiting) if self.waiting else 0.0

    @property
    def mean_load(self) -> float:
        return self.mean_running + self.mean_waiting

    @property
    def max_kv_usage(self) -> float:
        return max(self.kv_usage, default=0.0)

    def share(self, condition) -> float:
        """Share of the window's scrapes where condition(running, waiting, kv) held."""
        rows = list(zip(self.running, self.waiting, self.kv_usage))
        return sum(1 for r in rows if condition(*r)) / len(rows) if rows else 0.0

    @property
    def queued_share(self) -> float:
        return self.share(lambda r, w, kv: w > 0)

    @property
    def busy_share(self) -> float:
        return self.share(lambda r, w, kv: r > 0)

    # -- counters -------------------------------------------------------------------------
    def rate(self, name: str) -> float:
        return self.deltas.get(name, 0.0) / self.seconds if self.seconds > 0 else 0.0

    @property
    def max_num_seqs(self) -> int | None:
        return self.limits.get("max_num_seqs")

    @property
    def finished(self) -> float:
        return self.deltas.get("vllm:request_success", 0.0)


COUNTERS = ("vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits", "tokenmill:prefix_cache_missed_hits", "vllm:spec_decode_num_drafts",
            "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens", "vllm:request_success")
HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "queue": "vllm:request_queue_time_seconds",
              "tpot": "vllm:time_per_output_token_seconds", "e2e": "vllm:e2e_request_latency_seconds"}


def _model_of(labels: tuple[tuple[str, str], ...]) -> str | None:
    return dict(labels).get("model_name")


def _sum(scrape: Scrape, name: str, model: str, **match: str) -> float:
    return sum(v for (n, labels), v in scrape.samples.items()
               if n == name and _model_of(labels) == model and all(dict(labels).get(k) == x for k, x in match.items()))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's rule: the bucket where the q-th observation falls, linear inside it.
    `buckets`: (upper bound, cumulative count), ascending, ending with +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def _latency(first: Scrape, last: Scrape, name: str, model: str) -> Latency:
    growth: dict[float, float] = {}
    for (n, labels), v in last.samples.items():
        if n == name + "_bucket" and _model_of(labels) == model:
            le = float(dict(labels)["le"])
            growth[le] = v - first.samples.get((n, labels), 0.0)
    buckets = sorted(growth.items())
    if not buckets or buckets[-1][1] <= 0:
        return Latency()
    return Latency(buckets[-1][1], histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets))


def _models(replica: ReplicaRecording) -> list[str]:
    names = {_model_of(labels) for s in replica.scrapes for (n, labels) in s.samples
             if n == "vllm:num_requests_running"}
    return sorted(m for m in names if m is not None)


def windows(recording: Recording) -> list[ModelWindow]:
    out: list[ModelWindow] = []
    for replica in recording.replicas:
        if len(replica.scrapes) < 2:
            continue
        first, last = replica.scrapes[0], replica.scrapes[-1]
        for model in _models(replica):
            w = ModelWindow(
                replica=replica.url, model=model, seconds=last.at - first.at,
                times=[s.at for s in replica.scrapes],
                running=[_sum(s, "vllm:num_requests_running", model) for s in replica.scrapes],
                waiting=[_sum(s, "vllm:num_requests_waiting", model) for s in replica.scrapes],
                kv_usage=[_sum(s, "vllm:kv_cache_usage_perc", model) for s in replica.scrapes],
                deltas={c: _sum(last, c + "_total", model) - _sum(first, c + "_total", model) for c in COUNTERS},
                limits=replica.limits.get(model, {}),
            )
            for field_name, metric in HISTOGRAMS.items():
                setattr(w, field_name, _latency(first, last, metric, model))
            out.append(w)
    return out
