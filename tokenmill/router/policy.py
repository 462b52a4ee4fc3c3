"""The routing decision: which replica gets a request. Pure Python over snapshots, no clock
(the caller passes `now`), no I/O, randomness from the caller's Random: property-testable.

One decision, in order:
1. filter: hard (unhealthy, draining) then soft (saturated queue or KV, stale metrics);
   fail open when a stage leaves nobody, since trying a doubtful replica beats a certain 503;
2. imbalance guard (prefix policy): when the busiest and idlest candidates differ by more than
   `imbalance_abs` requests and a factor `imbalance_rel`, the idlest wins outright, so cache
   affinity can never pile a hot conversation set onto one replica;
3. the policy: `prefix` sends a request home when a replica holds at least `affinity_share`
   of its prompt (reason `affinity`), else scores, in blocks of prefill work,
   w_hit*hit - pending - w_queue*load - w_kv*kv_usage (docs/router.md);
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
    # Requests there that are not this router's (other routers', direct clients'), as of the
    # last scrape: what the replica counted minus what this router had open then (replicas.py).
    external: int = 0
    pending_blocks: int = 0  # predicted uncached blocks of this router's requests there not yet past prefill

    @property
    def load(self) -> int:
        # The router's own count is exact and current; the scrape lags up to a health interval
        # and, taken whole, counts this router's finished requests as still there (with 6
        # clients on 3 replicas the scraped sum ran to 9). So: its own now, others' as scraped.
        return self.in_flight + self.external


@dataclass(frozen=True)
class PolicyConfig:
    policy: str = "prefix"
    stale_after_s: float = 10.0
    max_waiting: int = 64
    max_kv_usage: float = 0.98
    imbalance_abs: int = 6
    imbalance_rel: float = 1.5
    # A replica holding this share of the prompt's blocks gets it outright (above 1: never).
    # A conversation's later turns then always go home, as long as the guard allows, so its
    # hits do not depend on how much prefill happens to be queued there at that moment.
    affinity_share: float = 0.5
    w_hit: float = 1.5  # per predicted cached block: its prefill saved here, and fleet time (docs/router.md)
    w_queue: float = 1.0  # blocks of prefill one request already there is worth in delay
    w_kv: float = 1.0  # blocks a full KV pool is worth (evictions ahead): a tie-breaker

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.stale_after_s <= 0 or self.imbalance_abs < 0 or self.imbalance_rel < 1:
            raise ValueError("stale_after_s > 0, imbalance_abs >= 0 and imbalance_rel >= 1 are required")


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # one of POLICIES, or "affinity", "imbalance", "fail-open"
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
        """The replica for one request, or None when there is none at all. `session`: the
        key for the session policy (a request without one is routed by prefix).
        `prompt_blocks`: the request's usable full blocks (the affinity rule's denominator)."""
        candidates, failed_open = self.eligible(views, now)
        if not candidates:
            return None
        policy = self.config.policy
        if policy == "session" and session is None:
            policy = "prefix"
        if policy == "prefix" and self._imbalanced(candidates):
            pick, reason = _random_min(candidates, lambda v: v.load, rng), "imbalance"
        elif policy == "prefix" and (home := self._home(candidates, prompt_blocks, rng)) is not None:
            pick, reason = home, "affinity"
        elif policy == "prefix":
            pick, reason = _random_max(candidates, self.score, rng), policy
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

    def _home(self, candidates: list[ReplicaView], prompt_blocks: int, rng: random.Random) -> ReplicaView | None:
        """The replica holding the most of this prompt, if that is at least affinity_share of it."""
        best = max(v.hit_blocks for v in candidates)
        if not prompt_blocks or not best or best < self.config.affinity_share * prompt_blocks:
            return None
        return _random_max([v for v in candidates if v.hit_blocks == best], self.score, rng)

    def score(self, v: ReplicaView) -> float:
        """Minus the prefill work (in blocks) this request would wait for there, with its own
        prompt's share (a constant over replicas: dropped) less what the replica has cached.
        Every term is in the same unit, so a 20-block hit is never outweighed by one request
        more in a queue, and a one-block hit never draws a request behind a 60-block prefill
        (the earlier score normalized hit and queue to 0..1 each: on 3 replicas with 0-3
        requests each, one request of difference cost as much as half the prompt cached)."""
        c = self.config
        return c.w_hit * v.hit_blocks - v.pending_blocks - c.w_queue * v.load - c.w_kv * v.kv_usage


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
