"""Canary split and the automatic plan, pure (time passed in)."""

import math
import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.router.rollout import Outcome, Rollout, RolloutConfig

CONFIG = RolloutConfig(min_samples=50, min_step_s=10.0)


@settings(max_examples=10, deadline=None)
@given(percent=st.sampled_from([10.0, 25.0, 50.0]), seed=st.integers(0, 1000))
def test_split_lands_within_the_binomial_interval(percent, seed):
    r = Rollout("v1", CONFIG)
    r.start("v2", 0.0, auto=False, percent=percent)
    rng = random.Random(seed)
    n = 5000
    canary = sum(r.version_for(uuid.UUID(int=rng.getrandbits(128)).hex) == "v2" for _ in range(n))
    p = percent / 100
    # 4.5 sigma: a correct split fails this about once in 150,000 runs
    assert abs(canary - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


def test_a_session_keeps_its_version_while_the_share_holds_and_only_grows_into_the_canary():
    r = Rollout("v1", CONFIG)
    r.start("v2", 0.0, auto=False, percent=10)
    keys = [f"user-{i}" for i in range(2000)]
    at10 = {k: r.version_for(k) for k in keys}
    assert all(r.version_for(k) == v for k, v in at10.items())
    r.set_percent(25, 1.0)
    at25 = {k: r.version_for(k) for k in keys}
    # Raising the share only moves stable sessions to the canary, never the reverse.
    assert all(at25[k] == "v2" for k in keys if at10[k] == "v2")
    assert sum(v == "v2" for v in at25.values()) > sum(v == "v2" for v in at10.values())


def _feed(r: Rollout, n: int, canary_error_rate: float, rng: random.Random, canary_ttft: float = 0.1):
    for _ in range(n):
        r.record("v1", Outcome(ok=True, ttft=0.1 + rng.random() * 0.01, tpot=0.02))
        r.record("v2", Outcome(ok=rng.random() >= canary_error_rate, ttft=canary_ttft, tpot=0.02))


@pytest.mark.parametrize("fault", ["errors", "ttft"])
def test_injected_canary_faults_roll_it_back(fault):
    rng = random.Random(0)
    r = Rollout("v1", CONFIG)
    r.start("v2", 0.0)
    assert r.percent == 10
    _feed(r, 49, 0.0, rng)
    assert r.evaluate(100.0) is None  # below the minimum sample: no verdict either way
    _feed(r, 60, 0.2 if fault == "errors" else 0.0, rng, canary_ttft=0.5 if fault == "ttft" else 0.1)
    event = r.evaluate(100.0)
    assert event.action == "rollback" and r.percent == 0 and r.state == "rolled-back"
    assert ("error rate" if fault == "errors" else "p99_ttft") in event.reason
    assert all(r.version_for(str(k)) == "v1" for k in range(500))
    assert r.evaluate(200.0) is None  # stays rolled back


def test_a_good_canary_walks_the_plan_and_is_promoted():
    rng = random.Random(0)
    r = Rollout("v1", CONFIG)
    r.start("v2", 0.0)
    seen = [r.percent]
    t = 0.0
    while r.canary is not None:
        _feed(r, 60, 0.0, rng)
        assert r.evaluate(t + 1.0) is None  # held at least min_step_s
        t += 11.0
        event = r.evaluate(t)
        seen.append(event.percent if event.action != "promote" else 100.0)
    assert seen == [10, 25, 50, 100]
    assert r.stable == "v2" and r.state == "stable" and r.version_for("anyone") == "v2"
    assert [e.action for e in r.events] == ["start", "advance", "advance", "promote"]


def test_admin_choice_stops_the_plan():
    r = Rollout("v1", CONFIG)
    r.start("v2", 0.0)
    r.set_percent(5, 1.0)
    assert not r.auto and r.percent == 5
    with pytest.raises(ValueError):
        r.set_percent(101, 2.0)
    assert r.set_percent(100, 3.0).action == "promote" and r.stable == "v2"
