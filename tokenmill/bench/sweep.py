"""--sweep: the same workload at rising request rates or concurrencies, to find the highest load
that still meets the SLO given with --goodput (judged on one statistic, p99 by default).

Points run in ascending order and the sweep stops at the first point that misses the SLO:
more load only queues more, so higher points would miss too, and each costs a full run.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from tokenmill.bench.metrics import BenchmarkMetrics
from tokenmill.bench.runner import LoadShape, RunResult

SWEEP_KINDS = ("rate", "concurrency")


@dataclass(frozen=True)
class SweepSpec:
    kind: str
    values: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SweepSpec:
        """'rate:1,2,4,inf' or 'concurrency:1,4,16'."""
        kind, sep, rest = text.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in SWEEP_KINDS:
            raise ValueError(f"bad --sweep {text!r}: expected rate:R1,R2,... or concurrency:C1,C2,...")
        try:
            values = sorted(float(v) for v in rest.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"bad --sweep {text!r}: values must be numbers (or inf for rates)") from None
        if not values or any(not v > 0 for v in values):
            raise ValueError(f"bad --sweep {text!r}: give one or more values > 0")
        if kind == "concurrency" and any(math.isinf(v) or v != int(v) for v in values):
            raise ValueError(f"bad --sweep {text!r}: concurrencies are whole numbers")
        return cls(kind, tuple(dict.fromkeys(values)))

    def shape(self, base: LoadShape, value: float) -> LoadShape:
        if self.kind == "rate":
            return replace(base, request_rate=value)
        return replace(base, max_concurrency=int(value))


@dataclass
class SweepPoint:
    value: float
    run: RunResult
    metrics: BenchmarkMetrics
    meets_slo: bool | None  # None when no SLO was given


@dataclass
class SweepResult:
    spec: SweepSpec
    slos: dict[str, float]
    stat: str
    points: list[SweepPoint] = field(default_factory=list)

    @property
    def best(self) -> SweepPoint | None:
        """The highest load meeting the SLO (None without an SLO, or if no point met it)."""
        passing = [p for p in self.points if p.meets_slo]
        return passing[-1] if passing else None

    @property
    def stopped_early(self) -> bool:
        return len(self.points) < len(self.spec.values)


RunPoint = Callable[[LoadShape], Awaitable[tuple[RunResult, BenchmarkMetrics]]]


async def run_sweep(spec: SweepSpec, base: LoadShape, slos: dict[str, float], run_point: RunPoint,
                    stat: str = "p99") -> SweepResult:
    result = SweepResult(spec, dict(slos), stat)
    for value in spec.values:
        run, metrics = await run_point(spec.shape(base, value))
        meets = metrics.meets(slos, stat) if slos else None
        result.points.append(SweepPoint(value, run, metrics, meets))
        if meets is False:
            break
    return result
