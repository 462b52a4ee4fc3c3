"""The autoscaling policy: replica snapshots -> how many replicas there should be, and why.

Pure Python, no clock, no I/O: the caller passes `now` (seconds, any monotonic origin) with
each observation, so the same policy runs inside Ray Serve's controller, behind a KEDA
trigger's thresholds, in a simulator on a virtual clock, and in property tests.

One decision, in order (docs/deploy.md, "Autoscaling policy"):
1. bounds: below the floor or above `max_replicas` is corrected at once (no delay);
2. cold start: at zero replicas, any demand asks for the floor (at least one) at once: the
   router holds a bounded queue meanwhile, every second counts;
3. load: the ongoing requests (running + waiting on the replicas, plus `pending` held in
   front of them) over `target_ongoing_requests` per replica give the count wanted;
4. saturation: a replica queue past `max_waiting`, KV usage past `max_kv_usage` or TTFT p99
   past `ttft_p99_slo_s` asks for one more replica whatever the load says (long prompts fill
   the KV cache long before the request count looks high);
5. hysteresis: scaling down needs the load to fit the smaller fleet with `hysteresis` to
   spare and every saturation signal below its threshold by the same margin, so noise around
   a threshold never flips the count back and forth;
6. delays: a wish to go up must hold for `upscale_delay_s`, one to go down for the longer
   `downscale_delay_s` (to zero: `scale_to_zero_delay_s`); a wish that lapses resets its timer;
7. step cap: one decision at most multiplies the count by `max_step_factor` up (and divides
   it by as much down), and always moves by at least one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica's load as its /metrics reports it (vLLM names in brackets)."""

    running: int = 0  # vllm:num_requests_running
    waiting: int = 0  # vllm:num_requests_waiting
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    ttft_p99_s: float | None = None  # from vllm:time_to_first_token_seconds; None: no recent request
    request_rate: float = 0.0  # requests/s arriving, from vllm:request_success or the router's count

    @property
    def ongoing(self) -> int:
        return self.running + self.waiting


@dataclass(frozen=True)
class AutoscaleConfig:
    """Defaults and their reasons: docs/deploy.md, "Autoscaling policy"."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_ongoing_requests: float = 16.0  # running + waiting per replica the fleet is sized for
    max_waiting: float = 8.0  # mean queue per replica that means "saturated"
    max_kv_usage: float = 0.90
    ttft_p99_slo_s: float | None = 5.0  # None: TTFT is not a signal
    hysteresis: float = 0.2  # down needs 20% spare on every signal
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    scale_to_zero: bool = False  # min_replicas applies while there is load; idle may go to 0
    scale_to_zero_delay_s: float = 600.0
    max_step_factor: float = 2.0

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("0 <= min_replicas <= max_replicas and max_replicas >= 1 are required")
        if self.target_ongoing_requests <= 0 or self.max_waiting < 0:
            raise ValueError("target_ongoing_requests > 0 and max_waiting >= 0 are required")
        if not 0 < self.max_kv_usage <= 1 or not 0 <= self.hysteresis < 1:
            raise ValueError("0 < max_kv_usage <= 1 and 0 <= hysteresis < 1 are required")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.scale_to_zero_delay_s) < 0:
            raise ValueError("delays must be >= 0")
        if self.max_step_factor <= 1:
            raise ValueError("max_step_factor must be > 1")
        if self.ttft_p99_slo_s is not None and self.ttft_p99_slo_s <= 0:
            raise ValueError("ttft_p99_slo_s must be > 0 (or None)")

    @property
    def floor(self) -> int:
        """The fewest replicas while there is any load: at least one, since a fleet of zero
        serves nobody; zero is reached only by the idle rule (scale_to_zero)."""
        return max(1, self.min_replicas)


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    current: int
    action: str  # "up", "down", "hold"
    reason: str  # one sentence a person can read in a log or an event
    signals: dict = field(default_factory=dict)  # the numbers the reason quotes

    @property
    def changed(self) -> bool:
        return self.desired != self.current


@dataclass
class Autoscaler:
    """The policy plus the only state it keeps: since when each wish has held."""

    config: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    up_since: float | None = None
    down_since: float | None = None

    def decide(self, now: float, current: int, replicas: list[ReplicaSnapshot], pending: int = 0) -> ScaleDecision:
        """`current`: replicas that exist (starting ones count as capacity, so a slow start
        does not ask for more again and again); `replicas`: snapshots of those that report;
        `pending`: requests held in front of the replicas (a router or Serve handle queue)."""
        c = self.config
        s = _signals(replicas, pending)
        if current > c.max_replicas:
            return self._act(current, c.max_replicas, "down", f"{current} replicas exceed max_replicas {c.max_replicas}", s)
        idle = s["ongoing"] == 0 and s["request_rate"] == 0
        floor = 0 if c.scale_to_zero and idle else c.floor
        if current < floor:
            reason = (f"cold start: {s['ongoing']} requests waiting and no replica" if current == 0 and not idle
                      else f"{current} replicas are below the floor {floor}")
            return self._act(current, floor, "up", reason, s)
        if current == 0:
            return self._hold(current, "no replicas and no demand", s)

        saturated = self._saturation(s, margin=1.0)
        by_load = math.ceil(s["ongoing"] / c.target_ongoing_requests)
        if saturated or by_load > current:
            want = max(by_load, current + 1)
            why = (f"saturated ({saturated})" if saturated else
                   f"{s['ongoing']} ongoing requests > {c.target_ongoing_requests:g} per replica x {current}")
            return self._wish_up(now, current, want, why, s)

        warm = self._saturation(s, margin=1.0 - c.hysteresis)
        fit = math.ceil(s["ongoing"] / (c.target_ongoing_requests * (1.0 - c.hysteresis)))
        want = max(fit, floor)
        if want < current and not warm:
            delay = c.scale_to_zero_delay_s if want == 0 else c.downscale_delay_s
            why = (f"{s['ongoing']} ongoing requests fit {want} replicas with "
                   f"{c.hysteresis:.0%} to spare")
            return self._wish_down(now, current, want, delay, why, s)
        self.up_since = self.down_since = None
        why = f"near saturation ({warm})" if warm and want < current else (
            f"{s['ongoing']} ongoing requests suit {current} replicas")
        return self._hold(current, why, s)

    def _saturation(self, s: dict, margin: float) -> str:
        """Which saturation signal is past its threshold x margin ('' if none)."""
        c = self.config
        if s["mean_waiting"] > c.max_waiting * margin:
            return f"mean queue {s['mean_waiting']:.1f} > {c.max_waiting * margin:g}"
        if s["max_kv_usage"] > c.max_kv_usage * margin:
            return f"KV usage {s['max_kv_usage']:.2f} > {c.max_kv_usage * margin:.2f}"
        if c.ttft_p99_slo_s is not None and s["ttft_p99_s"] is not None and s["ttft_p99_s"] > c.ttft_p99_slo_s * margin:
            return f"TTFT p99 {s['ttft_p99_s']:.2f}s > {c.ttft_p99_slo_s * margin:.2f}s"
        return ""

    def _wish_up(self, now: float, current: int, want: int, why: str, s: dict) -> ScaleDecision:
        c = self.config
        self.down_since = None
        if self.up_since is None:
            self.up_since = now
        waited = now - self.up_since
        if waited < c.upscale_delay_s:
            return self._hold(current, f"{why}; up to {want} after {c.upscale_delay_s:g}s (held {waited:.0f}s)", s)
        cap = max(current + 1, math.floor(current * c.max_step_factor))
        target = min(want, cap, c.max_replicas)
        if target <= current:
            return self._hold(current, f"{why}; already at max_replicas {c.max_replicas}", s)
        capped = f" (step cap {cap})" if want > cap else ""
        return self._act(current, target, "up", f"{why} for {waited:.0f}s{capped}", s)

    def _wish_down(self, now: float, current: int, want: int, delay: float, why: str, s: dict) -> ScaleDecision:
        self.up_since = None
        if self.down_since is None:
            self.down_since = now
        waited = now - self.down_since
        if waited < delay:
            return self._hold(current, f"{why}; down to {want} after {delay:g}s (held {waited:.0f}s)", s)
        cap = min(current - 1, math.ceil(current / self.config.max_step_factor))
        target = 0 if want == 0 else max(want, cap)
        capped = f" (step cap {cap})" if target > want else ""
        return self._act(current, target, "down", f"{why} for {waited:.0f}s{capped}", s)

    def _act(self, current: int, desired: int, action: str, reason: str, s: dict) -> ScaleDecision:
        self.up_since = self.down_since = None  # the next move waits its own delay
        return ScaleDecision(desired, current, action, f"{action} {current} -> {desired}: {reason}", s)

    @staticmethod
    def _hold(current: int, reason: str, s: dict) -> ScaleDecision:
        return ScaleDecision(current, current, "hold", f"hold {current}: {reason}", s)


def _signals(replicas: list[ReplicaSnapshot], pending: int) -> dict:
    n = len(replicas)
    ttfts = [r.ttft_p99_s for r in replicas if r.ttft_p99_s is not None]
    return {
        "ongoing": sum(r.ongoing for r in replicas) + pending,
        "pending": pending,
        "mean_waiting": (sum(r.waiting for r in replicas) + pending) / n if n else float(pending),
        "max_kv_usage": max((r.kv_usage for r in replicas), default=0.0),
        "ttft_p99_s": max(ttfts) if ttfts else None,
        "request_rate": sum(r.request_rate for r in replicas),
        "reporting": n,
    }
