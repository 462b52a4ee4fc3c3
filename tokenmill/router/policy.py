"""The routing decision: which replica gets a request. Pure Python over snapshots, no clock
(the caller passes `now`), no I/O, randomness from the caller's Random: property-testable.

One decision, in order:
1. filter: hard (unhealthy, draining) then soft (saturated queue or KV, stale metrics);
   fail open when a stage leaves nobody, since trying a doubtful replica beats a certain 503;
2. imbalance guard (prefix policy): when the busiest and idlest candidates differ by more than
   `imbalance_abs` requests and a factor `imbalance_rel`, the idlest wins outright, so cache
   affinity can never pile a hot conversation set onto one replica;
3. the policy: `prefix` scores w_hit*hit - w_queue*queue + w_kv*headroom (docs/router.md);
   `least-load`, `power-of-two`, `round-robin`, `session` (rendezvous hash of a session key).
Ties are broken at random, so equal replicas share load instead of the first taking it all.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

POLICIES = ("prefix", "least-load", "power-of-two", "round-robin", "session")


@dataclass(frozen=True)
class ReplicaView:
    """What the policy knows of one replica at decision time."""

    name: str
    healthy: bool = True
    draining: bool = False
    scraped_at: float | None = None  # when its metrics were last read; None: never
    waiting: int = 0  # engine queue, from its /metrics
    running: int = 0
    kv_usage: float = 0.0  # 0..1, from its /metrics
    in_flight: int = 0  # requests this router has open on it now (exact, never stale)
    hit_blocks: int = 0  # predicted prefix-cache hit for this request, in blocks

    @property
    def load(self) -> int:
        # The router's own count is exact for its traffic; the scraped one also sees other
        # routers' (and lags by a scrape): the larger is the better guess.
        return max(self.in_flight, self.running + self.waiting)


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "prefix"
    stale_after_s: float = 10.0
    max_waiting: int = 64
    max_kv_usage: float = 0.98
    imbalance_abs: int = 6
    imbalance_rel: float = 1.5
    w_hit: float = 1.0
    w_queue: float = 0.6
    w_kv: float = 0.2

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.stale_after_s <= 0 or self.imbalance_abs < 0 or self.imbalance_rel < 1:
            raise ValueError("stale_after_s > 0, imbalance_abs >= 0 and imbalance_rel >= 1 are required")


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # one of POLICIES, or "imbalance", "fail-open"
    hit_blocks: int = 0


@dataclass
class Policy:
    """The configured policy plus the one piece of state a policy keeps (the round-robin cursor)."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    _next: int = 0

    def eligible(self, views: list[ReplicaView], now: float) -> tuple[list[ReplicaView], bool]:
        """(candidates, failed_open)."""
        alive = [v for v in views if v.healthy and not v.draining]
        fit = [v for v in alive if self._fresh(v, now) and not self._saturated(v)]
        if fit:
            return fit, False
        if alive:
            return alive, True
        # Nobody passes a health check: a replica marked down may be back; never draining ones.
        return [v for v in views if not v.draining], True

    def _fresh(self, v: ReplicaView, now: float) -> bool:
        return v.scraped_at is not None and now - v.scraped_at <= self.config.stale_after_s

    def _saturated(self, v: ReplicaView) -> bool:
        return v.waiting > self.config.max_waiting or v.kv_usage > self.config.max_kv_usage

    def choose(self, views: list[ReplicaView], now: float, rng: random.Random,
               prompt_blocks: int = 0, session: str | None = None) -> Decision | None:
        """The replica for one request, or None when there is none at all. `prompt_blocks`:
        the request's usable full blocks (the hit term's denominator); `session`: the key
        for the session policy (a request without one is routed by prefix)."""
        candidates, failed_open = self.eligible(views, now)
        if not candidates:
            return None
        policy = self.config.policy
        if policy == "session" and session is None:
            policy = "prefix"
        if policy == "prefix" and self._imbalanced(candidates):
            pick, reason = _random_min(candidates, lambda v: v.load, rng), "imbalance"
        elif policy == "prefix":
            busiest = max(v.load for v in candidates)
            pick, reason = _random_max(candidates, lambda v: self.score(v, busiest, prompt_blocks), rng), policy
        elif policy == "least-load":
            pick, reason = _random_min(candidates, lambda v: v.load, rng), policy
        elif policy == "power-of-two":
            two = rng.sample(candidates, min(2, len(candidates)))
            pick, reason = _random_min(two, lambda v: v.load, rng), policy
        elif policy == "round-robin":
            ordered = sorted(candidates, key=lambda v: v.name)
            pick, reason = ordered[self._next % len(ordered)], policy
            self._next += 1
        else:
            pick, reason = max(candidates, key=lambda v: rendezvous(session, v.name)), policy
        return Decision(pick.name, "fail-open" if failed_open else reason, pick.hit_blocks)

    def _imbalanced(self, candidates: list[ReplicaView]) -> bool:
        loads = [v.load for v in candidates]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.config.imbalance_abs and hi > self.config.imbalance_rel * lo

    def score(self, v: ReplicaView, busiest: int, prompt_blocks: int) -> float:
        """hit: share of the prompt's blocks predicted cached there (0..1); queue: its load
        relative to the busiest candidate's (0..1); headroom: free share of its KV pool (0..1)."""
        c = self.config
        hit = v.hit_blocks / prompt_blocks if prompt_blocks else 0.0
        queue = v.load / busiest if busiest else 0.0
        return c.w_hit * hit - c.w_queue * queue + c.w_kv * (1.0 - v.kv_usage)


def rendezvous(key: str, name: str) -> int:
    """Highest-random-weight hashing: each key's order of replicas is fixed, so removing one
    replica moves only the keys it held, and adding one takes a fair share from each."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest(), "big")


def _random_min(views: list[ReplicaView], key, rng: random.Random) -> ReplicaView:
    best = min(key(v) for v in views)
    return rng.choice([v for v in views if key(v) == best])


def _random_max(views: list[ReplicaView], key, rng: random.Random) -> ReplicaView:
    scores = [(key(v), v) for v in views]
    best = max(s for s, _ in scores)
    return rng.choice([v for s, v in scores if s >= best - 1e-9])
