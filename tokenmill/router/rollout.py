"""Canary rollouts: which version a request goes to, and when to move the split.

Pure Python, no clock (time comes in). The split is by a hash of the request's session key,
so a conversation stays on one version (and its cache) while the share holds; a request
without a session key gets a random one. The automatic plan moves the canary's share up a
step (10 -> 25 -> 50 -> 100 %) only when, over at least `min_samples` requests of each
version since the step began, the canary's error rate and its p99 TTFT and TPOT are within
bounds of stable's; when they are not, the share drops to 0 by itself. Reaching 100 promotes
the canary to stable. Every move is an Event, logged and counted by the caller.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

_BUCKETS = 10_000  # split resolution: 0.01 %


@dataclass(frozen=True)
class RolloutConfig:
    plan: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    min_samples: int = 100  # per version, per step
    min_step_s: float = 30.0  # a step is held at least this long
    max_error_rate_delta: float = 0.02  # canary errors may exceed stable's by this share
    max_latency_ratio: float = 1.5  # canary p99 TTFT / TPOT may be this times stable's

    def __post_init__(self):
        if not self.plan or list(self.plan) != sorted(self.plan) or not 0 < self.plan[0] <= self.plan[-1] <= 100:
            raise ValueError(f"a plan is increasing percentages in (0, 100]: {self.plan}")


@dataclass
class Outcome:
    ok: bool
    ttft: float | None = None  # seconds to the first streamed byte
    tpot: float | None = None  # seconds per output token after the first


@dataclass
class Window:
    """One version's outcomes since the current step began."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def error_rate(self) -> float:
        return sum(not o.ok for o in self.outcomes) / self.n if self.n else 0.0

    @property
    def p99_ttft(self) -> float | None:
        return p99([o.ttft for o in self.outcomes if o.ok and o.ttft is not None])

    @property
    def p99_tpot(self) -> float | None:
        return p99([o.tpot for o in self.outcomes if o.ok and o.tpot is not None])


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


@dataclass(frozen=True)
class Event:
    at: float
    action: str  # start | advance | promote | rollback | set | hold
    percent: float
    reason: str


def split_bucket(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"tm-split").digest(), "big") % _BUCKETS


@dataclass
class Rollout:
    stable: str
    config: RolloutConfig = field(default_factory=RolloutConfig)
    canary: str | None = None
    percent: float = 0.0  # the canary's share
    auto: bool = False  # follow the plan by itself
    step_started: float = 0.0
    windows: dict[str, Window] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.canary is None:
            return "stable"
        return "rolled-back" if self.percent == 0 and self.events and self.events[-1].action == "rollback" else "canary"

    @property
    def splitting(self) -> bool:
        return self.canary is not None and self.percent > 0

    def version_for(self, session_key: str) -> str:
        if not self.splitting:
            return self.stable
        return self.canary if split_bucket(session_key) < self.percent * _BUCKETS / 100 else self.stable

    def start(self, canary: str, now: float, auto: bool = True, percent: float | None = None) -> Event:
        self.canary, self.auto = canary, auto
        return self._move(now, "start", self.config.plan[0] if percent is None else percent, f"canary {canary}")

    def set_percent(self, percent: float, now: float, reason: str = "admin") -> Event:
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in [0, 100]: {percent}")
        if self.canary is None:
            raise ValueError("no canary to split traffic with")
        self.auto = False  # an operator's choice is not overridden by the plan
        if percent == 100:
            return self._promote(now, reason)
        return self._move(now, "set", percent, reason)

    def record(self, version: str, outcome: Outcome) -> None:
        if version in (self.stable, self.canary):
            self.windows.setdefault(version, Window()).outcomes.append(outcome)

    def evaluate(self, now: float) -> Event | None:
        """One look at the gate: rollback, advance (or promote), or nothing yet."""
        if not self.auto or self.canary is None or self.percent <= 0:
            return None
        canary, stable = self.windows.get(self.canary, Window()), self.windows.get(self.stable, Window())
        if canary.n < self.config.min_samples or stable.n < self.config.min_samples:
            return None
        worse = self.worse(canary, stable)
        if worse:
            self.auto = False
            return self._move(now, "rollback", 0.0, worse)
        if now - self.step_started < self.config.min_step_s:
            return None
        higher = [p for p in self.config.plan if p > self.percent]
        if not higher or higher[0] >= 100:
            return self._promote(now, "within bounds at every step")
        return self._move(now, "advance", higher[0], "within bounds")

    def worse(self, canary: Window, stable: Window) -> str | None:
        """Why the canary is worse than stable, or None when it is within bounds."""
        c = self.config
        if canary.error_rate > stable.error_rate + c.max_error_rate_delta:
            return f"error rate {canary.error_rate:.3f} vs stable {stable.error_rate:.3f}"
        for name in ("p99_ttft", "p99_tpot"):
            mine, theirs = getattr(canary, name), getattr(stable, name)
            if mine is not None and theirs is not None and mine > c.max_latency_ratio * theirs:
                return f"{name} {mine * 1000:.1f} ms vs stable {theirs * 1000:.1f} ms"
        return None

    def _promote(self, now: float, reason: str) -> Event:
        self.stable, self.canary, self.auto = self.canary, None, False
        return self._move(now, "promote", 0.0, reason)

    def _move(self, now: float, action: str, percent: float, reason: str) -> Event:
        self.percent, self.step_started = percent, now
        self.windows.clear()  # each step is judged on its own traffic
        event = Event(now, action, percent, reason)
        self.events.append(event)
        return event

    def snapshot(self) -> dict:
        return {"stable": self.stable, "canary": self.canary, "percent": self.percent, "auto": self.auto,
                "state": self.state, "plan": list(self.config.plan),
                "samples": {v: w.n for v, w in self.windows.items()},
                "events": [e.__dict__ for e in self.events[-20:]]}
