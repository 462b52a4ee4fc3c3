"""Summary metrics over request records, defined as `vllm bench serve` defines them.

- completed/failed: requests whose stream finished cleanly / did not.
- throughputs divide by the wall duration of the measured phase (warm-ups excluded).
- TTFT, TPOT, ITL and E2E statistics are over successful requests; TPOT skips requests with
  one output token; ITL pools every gap of every request.
- goodput counts requests meeting every given SLO (a one-token request's TPOT counts as 0).
- std is the population standard deviation; percentiles interpolate linearly (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenmill.bench.records import RequestRecord

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"bad --goodput item {item!r}: expected NAME:MS with NAME in {SLO_METRICS}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad --goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"bad --goodput item {item!r}: the SLO must be a finite number >= 0")
        slos[name] = ms
    return slos


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9': vLLM's spelling in result-JSON keys."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


@dataclass(frozen=True)
class Distribution:
    """Statistics of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]
    count: int

    @classmethod
    def of_seconds(cls, values: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        # Like vLLM, an empty metric reports zeros rather than NaN, so tables and JSON stay numeric.
        arr = np.asarray(values if len(values) else [0.0], dtype=float) * 1000.0
        return cls(
            mean=float(np.mean(arr)),
            median=float(np.median(arr)),
            std=float(np.std(arr)),
            percentiles={float(p): float(np.percentile(arr, p)) for p in percentiles},
            count=len(values),
        )


@dataclass(frozen=True)
class BenchmarkMetrics:
    duration: float
    completed: int
    failed: int
    total_input: int
    total_output: int
    good_completed: int
    goodput_slos: dict[str, float]
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    percentiles: tuple[float, ...] = field(default=DEFAULT_PERCENTILES)

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration if self.duration > 0 else 0.0

    @property
    def request_goodput(self) -> float | None:
        if not self.goodput_slos:
            return None
        return self.good_completed / self.duration if self.duration > 0 else 0.0

    @property
    def output_throughput(self) -> float:
        return self.total_output / self.duration if self.duration > 0 else 0.0

    @property
    def total_token_throughput(self) -> float:
        return (self.total_input + self.total_output) / self.duration if self.duration > 0 else 0.0

    def distribution(self, name: str) -> Distribution:
        return getattr(self, name)

    def stat_value(self, name: str, stat: str) -> float:
        """`stat` is 'mean', 'median' or 'pNN' (one of the computed percentiles)."""
        d = self.distribution(name)
        if stat == "mean":
            return d.mean
        if stat == "median":
            return d.median
        return d.percentiles[float(stat.removeprefix("p"))]

    def meets(self, slos: dict[str, float], stat: str = "p99") -> bool:
        """Every SLO metric's `stat` within its bound, and at least one request completed."""
        return self.completed > 0 and all(self.stat_value(n, stat) <= bound for n, bound in slos.items())


def fill_output_tokens(records: Sequence[RequestRecord], count_tokens: Callable[[str], int] | None) -> None:
    """Recount completion tokens for successful requests the server gave no usage for."""
    for r in records:
        if r.success and not r.output_tokens:
            if count_tokens is None:
                # Without a tokenizer, one text chunk is our best guess at one token.
                r.output_tokens = len(r.itl) + 1 if r.generated_text else 0
            else:
                r.output_tokens = count_tokens(r.generated_text)


def is_good(r: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] * 1000.0 <= bound for name, bound in slos.items())


def peak_output_rate(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """Highest text-chunk count in any one-second bucket, and the most requests active at some
    time within one bucket (vLLM's max_output_tokens_per_s / max_concurrent_requests; the latter
    counts requests that merely overlap the same second, so it can exceed --max-concurrency)."""
    ok = [r for r in records if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    n = math.ceil(max(r.end_time for r in ok) - t0) + 1
    tokens = np.zeros(n)
    active = np.zeros(n)
    for r in ok:
        for t in r.token_times:
            b = int(t - t0)
            if 0 <= b < n:
                tokens[b] += 1
        active[int(r.start_time - t0): int(r.end_time - t0) + 1] += 1
    return float(tokens.max()), int(active.max())


def compute_metrics(
    records: Sequence[RequestRecord],
    duration: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput_slos: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """`records` must already have output_tokens filled (see fill_output_tokens)."""
    slos = dict(goodput_slos or {})
    ok = [r for r in records if r.success]
    peak_tokens, peak_active = peak_output_rate(records)
    return BenchmarkMetrics(
        duration=duration,
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input=sum(r.prompt_len for r in ok),
        total_output=sum(r.output_len for r in ok),
        good_completed=sum(1 for r in ok if is_good(r, slos)) if slos else 0,
        goodput_slos=slos,
        ttft=Distribution.of_seconds([r.ttft for r in ok], percentiles),
        tpot=Distribution.of_seconds([r.tpot for r in ok if r.tpot is not None], percentiles),
        itl=Distribution.of_seconds([g for r in ok for g in r.itl], percentiles),
        e2el=Distribution.of_seconds([r.latency for r in ok], percentiles),
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_active,
        percentiles=tuple(float(p) for p in percentiles),
    )
