"""`tokenmill plan search`: the cheapest fleet that carries a load within an SLO.

For each replica configuration (hardware x tensor parallel x weight format x batch limit),
the highest Poisson request rate one replica sustains with every SLO met at p99 (doubling,
then bisection, each probe a simulation of the engine's scheduler on the cost model); then
the replicas the asked load needs, their price, and $ per million output tokens. Replicas
are independent under a load-balancing router, so a fleet's capacity is taken as replicas x
one replica's: the simulator can check a chosen fleet whole (`plan simulate --replicas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tokenmill.bench.metrics import BenchmarkMetrics
from tokenmill.plan.replica import ReplicaSpec
from tokenmill.plan.workload import TraceRequest

HOURS_PER_MONTH = 730


@dataclass
class Capacity:
    spec: ReplicaSpec
    max_rate: float  # requests/s one replica sustains within the SLO (0: not even the lowest probe)
    metrics: BenchmarkMetrics | None  # at max_rate

    @property
    def output_tokens_per_s(self) -> float:
        return self.metrics.output_throughput if self.metrics else 0.0


@dataclass
class FleetOption:
    capacity: Capacity
    replicas: int
    spot: bool = False

    @property
    def spec(self) -> ReplicaSpec:
        return self.capacity.spec

    @property
    def chips(self) -> int:
        return self.replicas * self.spec.tp

    @property
    def dollars_per_hour(self) -> float:
        return self.replicas * self.spec.price_per_hour(self.spot)

    @property
    def dollars_per_month(self) -> float:
        return self.dollars_per_hour * HOURS_PER_MONTH

    @property
    def dollars_per_million_tokens(self) -> float:
        """At the load the replica was sized for (its SLO-bound rate)."""
        tok = self.capacity.output_tokens_per_s
        return self.spec.price_per_hour(self.spot) / (tok * 3600) * 1e6 if tok else math.inf


def meets(metrics: BenchmarkMetrics, slos: dict[str, float], rate: float, stat: str = "p99") -> bool:
    # A replica falling behind shows as a queue: also ask that it finished the trace at about
    # the offered rate (else a short trace would hide an unbounded backlog).
    return metrics.failed == 0 and metrics.meets(slos, stat) and metrics.request_throughput >= 0.8 * rate


def max_rate(spec: ReplicaSpec, trace_at: Callable[[float], list[TraceRequest]], slos: dict[str, float],
             start: float = 1.0, iterations: int = 6, stat: str = "p99") -> Capacity:
    """Highest rate meeting the SLO: double from `start` until a probe fails, then bisect."""
    def probe(rate: float) -> BenchmarkMetrics:
        return spec.simulator(record_itl=False).run(trace_at(rate)).metrics

    if not spec.fits:
        return Capacity(spec, 0.0, None)
    lo, lo_m, hi = 0.0, None, start
    while True:
        m = probe(hi)
        if not meets(m, slos, hi, stat):
            break
        lo, lo_m, hi = hi, m, hi * 2
        if hi > 1e5:
            break
    if lo == 0.0:  # even `start` fails: search below it
        lo, hi = 0.0, start
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = probe(mid)
        if meets(m, slos, mid, stat):
            lo, lo_m = mid, m
        else:
            hi = mid
    return Capacity(spec, lo, lo_m)


def cheapest(capacities: list[Capacity], total_rate: float, spot: bool = False) -> list[FleetOption]:
    options = [FleetOption(c, math.ceil(total_rate / c.max_rate), spot) for c in capacities if c.max_rate > 0]
    return sorted(options, key=lambda o: o.dollars_per_hour)


def plot(options: list[FleetOption], path: str) -> str | None:
    """Fleet cost against one replica's SLO-bound throughput; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for o in options:
        ax.scatter(o.capacity.output_tokens_per_s, o.dollars_per_month / 1e3)
        ax.annotate(o.spec.label, (o.capacity.output_tokens_per_s, o.dollars_per_month / 1e3), fontsize=7)
    ax.set_xlabel("output tokens/s per replica within the SLO")
    ax.set_ylabel("fleet cost, $K / month")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
