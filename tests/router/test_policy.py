"""The routing decision with fake replicas (pure: no HTTP, no clock)."""

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.router.policy import POLICIES, Policy, PolicyConfig, ReplicaView, rendezvous
from tokenmill.router.replicas import Replica

NOW = 1000.0


@st.composite
def fleets(draw):
    n = draw(st.integers(1, 8))
    views = []
    for i in range(n):
        views.append(ReplicaView(
            name=f"r{i}",
            healthy=draw(st.booleans()),
            draining=draw(st.booleans()),
            scraped_at=draw(st.sampled_from([None, NOW - 100, NOW - 1, NOW])),
            waiting=draw(st.integers(0, 100)),
            running=draw(st.integers(0, 40)),
            kv_usage=draw(st.floats(0, 1)),
            in_flight=draw(st.integers(0, 60)),
            hit_blocks=draw(st.integers(0, 10)),
        ))
    return views


def _fit(v: ReplicaView, c: PolicyConfig) -> bool:
    return (v.healthy and not v.draining and v.scraped_at is not None and NOW - v.scraped_at <= c.stale_after_s
            and v.waiting <= c.max_waiting and v.kv_usage <= c.max_kv_usage)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a shared, loaded box
@given(views=fleets(), policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**32), session=st.text(max_size=5))
def test_dead_draining_stale_never_chosen_when_a_fit_replica_exists(views, policy, seed, session):
    p = Policy(PolicyConfig(policy=policy))
    d = p.choose(views, NOW, random.Random(seed), prompt_blocks=10, session=session)
    by_name = {v.name: v for v in views}
    if any(_fit(v, p.config) for v in views):
        assert _fit(by_name[d.replica], p.config) and d.reason != "fail-open"
    elif any(v.healthy and not v.draining for v in views):  # fail open, still never dead or draining
        assert by_name[d.replica].healthy and not by_name[d.replica].draining and d.reason == "fail-open"
    elif all(v.draining for v in views):
        assert d is None
    else:
        assert not by_name[d.replica].draining


def _fresh(name, **kw) -> ReplicaView:
    return ReplicaView(name, scraped_at=NOW, **kw)


@given(hot=st.integers(20, 60), cold=st.integers(0, 5), hit=st.integers(1, 10))
def test_imbalance_guard_sends_to_the_idlest_even_against_a_full_hit(hot, cold, hit):
    views = [_fresh("hot", in_flight=hot, hit_blocks=hit), _fresh("cold", in_flight=cold),
             _fresh("mid", in_flight=cold + 2)]
    d = Policy().choose(views, NOW, random.Random(0), prompt_blocks=hit)
    assert d.replica == "cold" and d.reason == "imbalance"


def test_prefix_hit_wins_when_load_is_even():
    views = [_fresh("a", in_flight=2), _fresh("b", in_flight=2, hit_blocks=8), _fresh("c", in_flight=2)]
    d = Policy().choose(views, NOW, random.Random(0), prompt_blocks=10)
    assert (d.replica, d.reason, d.hit_blocks) == ("b", "affinity", 8)


def test_queue_outweighs_a_small_hit():
    views = [_fresh("a", in_flight=5, hit_blocks=1), _fresh("b", in_flight=1)]
    assert Policy().choose(views, NOW, random.Random(0), prompt_blocks=10).replica == "b"


def test_a_long_hit_outweighs_one_request_more_in_the_queue():
    # 24 of 67 blocks cached behind 3 requests vs 7 cached behind 1: the earlier score (hit
    # share minus load over the busiest's) sent this one away, losing 17 blocks of cache.
    views = [_fresh("home", in_flight=3, hit_blocks=24), _fresh("other", in_flight=1, hit_blocks=7)]
    assert Policy().choose(views, NOW, random.Random(0)).replica == "home"


@given(hit=st.integers(1, 30), pending=st.integers(0, 60), load=st.integers(0, 3))
def test_below_the_affinity_share_a_hit_wins_exactly_when_it_saves_more_than_the_prefill_waiting_there(
        hit, pending, load):
    views = [_fresh("home", in_flight=load, hit_blocks=hit, pending_blocks=pending), _fresh("idle", in_flight=load)]
    p = Policy()
    d = p.choose(views, NOW, random.Random(0), prompt_blocks=4 * hit)  # a quarter cached: scored
    assert d.reason == "prefix"
    saved = p.config.w_hit * hit  # blocks of prefill the hit saves, against those queued there
    if saved > pending:
        assert d.replica == "home"
    elif saved < pending:
        assert d.replica == "idle"


@given(share=st.floats(0.0, 1.0), pending=st.integers(0, 200), load=st.integers(0, 6), seed=st.integers(0, 99))
def test_a_replica_holding_the_affinity_share_gets_it_whatever_is_queued_there(share, pending, load, seed):
    prompt = 40
    hit = round(share * prompt)
    views = [_fresh("home", in_flight=load, hit_blocks=hit, pending_blocks=pending),
             _fresh("other", hit_blocks=min(hit, 3)), _fresh("idle")]
    p = Policy()
    d = p.choose(views, NOW, random.Random(seed), prompt_blocks=prompt)
    if hit > 3 and hit >= p.config.affinity_share * prompt:
        assert (d.replica, d.reason) == ("home", "affinity")
    else:
        assert d.reason == "prefix"


def test_the_imbalance_guard_overrides_affinity_and_a_share_above_one_turns_it_off():
    views = [_fresh("home", in_flight=20, hit_blocks=40), _fresh("idle")]
    assert Policy().choose(views, NOW, random.Random(0), prompt_blocks=40).reason == "imbalance"
    views = [_fresh("home", in_flight=2, hit_blocks=40, pending_blocks=100), _fresh("idle")]
    off = Policy(PolicyConfig(affinity_share=1.01)).choose(views, NOW, random.Random(0), prompt_blocks=40)
    assert (off.replica, off.reason) == ("idle", "prefix")


def test_the_router_counts_its_own_requests_now_and_only_others_from_the_scrape():
    # Scraped 3 running while this router had 3 open there; 2 have finished since: the load
    # is this router's 1, not the stale 3 (nor the two added up).
    r = Replica("http://a", running=3, in_flight=1, in_flight_at_scrape=3)
    assert r.view().load == 1
    # Another client's 2 requests stay counted on top of this router's own.
    r.running = 5
    assert r.view().load == 3
    # A scrape that counted fewer than this router had open (some finished first) adds none.
    r.running = 1
    assert r.view().load == 1


@given(hot=st.integers(0, 12), cold=st.integers(0, 12))
def test_imbalance_guard_needs_both_the_absolute_and_the_relative_gap(hot, cold):
    cfg = PolicyConfig(imbalance_abs=3, imbalance_rel=2.0)
    views = [_fresh("hot", in_flight=hot, hit_blocks=100), _fresh("cold", in_flight=cold)]
    d = Policy(cfg).choose(views, NOW, random.Random(0))
    fires = abs(hot - cold) > 3 and max(hot, cold) > 2.0 * min(hot, cold)
    assert (d.reason == "imbalance") == fires
    if fires:
        assert d.replica == ("cold" if hot > cold else "hot")


def test_ties_are_broken_at_random():
    views = [_fresh(f"r{i}") for i in range(4)]
    rng = random.Random(1)
    picks = {Policy().choose(views, NOW, rng).replica for _ in range(200)}
    assert picks == {"r0", "r1", "r2", "r3"}


def test_round_robin_cycles_and_least_load_takes_the_idlest():
    views = [_fresh("a", in_flight=3), _fresh("b", in_flight=1), _fresh("c", in_flight=2)]
    rr = Policy(PolicyConfig(policy="round-robin"))
    assert [rr.choose(views, NOW, random.Random(0)).replica for _ in range(6)] == list("abcabc")
    assert Policy(PolicyConfig(policy="least-load")).choose(views, NOW, random.Random(0)).replica == "b"
    p2 = Policy(PolicyConfig(policy="power-of-two"))
    assert all(p2.choose(views, NOW, random.Random(s)).replica != "a" for s in range(100))  # never the max of 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30), n=st.integers(2, 8))
def test_sessions_stick_and_only_a_leaving_replicas_sessions_move(keys, n):
    views = [_fresh(f"r{i}", in_flight=i) for i in range(n)]
    p = Policy(PolicyConfig(policy="session"))
    first = {k: p.choose(views, NOW, random.Random(0), session=k).replica for k in keys}
    again = {k: p.choose(views, NOW, random.Random(1), session=k).replica for k in keys}
    assert first == again  # load changes nothing: sticky
    gone = views[0].name
    after = {k: p.choose(views[1:], NOW, random.Random(0), session=k).replica for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != gone)


def test_rendezvous_spreads_sessions_evenly():
    names = [f"r{i}" for i in range(4)]
    counts = {n: 0 for n in names}
    for k in range(8000):
        counts[max(names, key=lambda n: rendezvous(str(k), n))] += 1
    assert all(abs(c - 2000) < 4 * math.sqrt(8000 * 0.25 * 0.75) for c in counts.values())


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        PolicyConfig(policy="fastest")
