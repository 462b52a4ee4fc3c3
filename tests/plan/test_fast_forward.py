"""Fast-forward is exact: a fleet simulated with runs of steady decode steps applied in bulk
gives every request the same token times, and every replica the same steps, preemptions,
prefix hits and KV pool (down to the free queue's order and the cached keys), as the same
fleet simulated one scheduler step at a time."""

import pytest

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import hardware, model_shape
from tokenmill.plan.cost import ConstantCost, CostModel, Profile, SeqShape
from tokenmill.plan.simulator import Simulator
from tokenmill.plan.workload import synthetic
from tokenmill.router.policy import Policy

LLAMA8B, H100 = model_shape("llama-3.1-8b"), hardware("H100")


def _cost():
    return CostModel(LLAMA8B, H100, Profile("H100", "bf16"))


def _run(trace, fast_forward, num_blocks=400, replicas=3, policy="least-load", cost=None, **kw):
    config = EngineConfig.from_flat(num_kv_blocks=num_blocks, max_num_seqs=16, max_num_batched_tokens=256,
                                    **kw.pop("cache", {}))
    sim = Simulator(config, num_blocks, 8192, cost or _cost(), 128256, num_replicas=replicas, policy=policy,
                    seed=3, log_steps=True, fast_forward=fast_forward, timeline_every_s=0.25, **kw)
    return sim, sim.run(trace)


def _pool(kv):
    return list(kv.pool.free_queue), dict(kv.pool.cached), [b.ref_cnt for b in kv.pool.blocks], kv.num_evictions


def _assert_same(fast, slow):
    (fsim, f), (ssim, s) = fast, slow
    assert [(r.start_time, r.ttft, r.itl, r.latency, r.output_tokens, r.error) for r in f.records] == \
        [(r.start_time, r.ttft, r.itl, r.latency, r.output_tokens, r.error) for r in s.records]
    for fr, sr in zip(f.replicas, s.replicas):
        assert fr.num_steps == sr.num_steps and fr.busy_seconds == sr.busy_seconds
        assert [st for st in f.steps if st["replica"] == fr.name] == [st for st in s.steps if st["replica"] == sr.name]
        fk, sk = fr.scheduler.kv, sr.scheduler.kv
        assert (fk.prefix_queries, fk.prefix_hits) == (sk.prefix_queries, sk.prefix_hits)
        assert _pool(fk) == _pool(sk)
    assert f.num_preemptions == s.num_preemptions
    assert [p.__dict__ for p in f.timeline] == [p.__dict__ for p in s.timeline]
    assert f.metrics.completed == s.metrics.completed > 0
    assert _schedule_calls(fast) < s.num_steps  # some steps were taken in runs, not by schedule()


@pytest.mark.parametrize("policy", ["least-load", "prefix"])
def test_fleet_with_prefix_hits_and_evictions(policy):
    # A small pool: shared prefixes get evicted by decode allocations while requests keep
    # arriving mid-run, so runs are cut and routing reads a replica's state mid-run.
    trace = synthetic(150, rate=30, input_len=300, output_len=60, range_ratio=0.8, prefix_len=48, seed=2,
                      num_prefixes=3)
    fast = _run(trace, True, num_blocks=600, policy=policy)
    slow = _run(trace, False, num_blocks=600, policy=policy)
    _assert_same(fast, slow)
    res = slow[1]
    assert res.prefix_hit_rate > 0 and sum(r.scheduler.kv.num_evictions for r in res.replicas) > 0
    assert fast[0].fast_forward and _schedule_calls(fast) < 0.5 * res.num_steps  # runs replaced most steps


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_and_closed_loop(caching):
    trace = synthetic(60, input_len=200, output_len=100, range_ratio=0.5, seed=4, prefix_len=32)
    kw = dict(num_blocks=40, replicas=2, max_concurrency=12, think_time_s=0.05,
              cache={"enable_prefix_caching": caching})
    fast, slow = _run(trace, True, **kw), _run(trace, False, **kw)
    _assert_same(fast, slow)
    assert slow[1].num_preemptions > 0
    kv = slow[1].replicas[0].scheduler.kv
    assert (kv.prefix_hits > 0) if caching else (kv.missed_prefix_hits > 0)


@pytest.mark.parametrize("blocks", [40, 400])
def test_least_load_shortcut_decides_as_the_router_policy(monkeypatch, blocks):
    # 40 blocks: replicas saturate (KV over 98%) and the policy filters or fails open.
    trace = synthetic(120, rate=60, input_len=200, output_len=60, range_ratio=0.5, seed=6)
    fast = _run(trace, True, num_blocks=blocks, replicas=4)
    monkeypatch.setattr(Simulator, "_least_loaded", lambda self, request, now: self._route_by_views(request, now))
    filtered = []
    eligible = Policy.eligible

    def counting(self, views, now):
        candidates, failed_open = eligible(self, views, now)
        filtered.append(failed_open or len(candidates) < len(views))
        return candidates, failed_open

    monkeypatch.setattr(Policy, "eligible", counting)
    policy = _run(trace, True, num_blocks=blocks, replicas=4)
    _assert_same(fast, policy)
    assert len(filtered) == 120 and any(filtered) == (blocks == 40)


def test_block_size_one_and_constant_cost():
    # Every step allocates and keys a block for every request; equal step times make ties.
    trace = synthetic(40, rate=20, input_len=30, output_len=30, range_ratio=0.5, seed=5)
    kw = dict(num_blocks=900, replicas=1, cost=ConstantCost(0.01), cache={"block_size": 1})
    _assert_same(_run(trace, True, **kw), _run(trace, False, **kw))


@pytest.mark.parametrize("seed,block_size,num_blocks", [(11, 4, 300), (12, 8, 500), (13, 16, 120)])
def test_runs_start_and_fill_blocks_at_every_residue(seed, block_size, num_blocks):
    # Mixed prompt and output lengths and staggered arrivals put a run's requests at every
    # residue of the block size, so its per-residue plans allocate and key blocks at every step
    # offset; shared prefixes and pools sized to evict (and, at 4 and 16, to preempt) make the order
    # of those allocations and keys matter.
    trace = synthetic(90, rate=40, input_len=120, output_len=70, range_ratio=0.9, prefix_len=2 * block_size,
                      seed=seed, num_prefixes=2)
    kw = dict(num_blocks=num_blocks, replicas=2, cache={"block_size": block_size})
    fast, slow = _run(trace, True, **kw), _run(trace, False, **kw)
    _assert_same(fast, slow)
    res = slow[1]
    assert res.prefix_hit_rate > 0 and sum(r.scheduler.kv.num_evictions for r in res.replicas) > 0


@pytest.mark.parametrize("closed_loop", [False, True])
def test_the_fronts_costs_apply_alike(closed_loop):
    # Each arrival lengthens the step (or the run's step) in progress by arrival_s, and requests
    # reach the schedulers ingress_s after their sends: both paths must do the same, and the
    # terms must reach the results.
    trace = synthetic(120, rate=40, input_len=200, output_len=60, range_ratio=0.5, prefix_len=32, seed=8)
    kw = dict(max_concurrency=10, think_time_s=0.02) if closed_loop else {}
    cost = CostModel(LLAMA8B, H100, Profile("H100", "bf16", arrival_s=0.004, ingress_s=0.003, egress_s=0.002))
    fast, slow = _run(trace, True, cost=cost, **kw), _run(trace, False, cost=cost, **kw)
    _assert_same(fast, slow)
    plain = _run(trace, True, **kw)[1]  # (longer steps batch more: the fleet's busy time need not grow)
    assert [r.ttft for r in slow[1].records] != [r.ttft for r in plain.records]


@pytest.mark.parametrize("leftover_s", [0.0, 0.002])
def test_decode_step_seconds_equals_the_per_row_price(leftover_s):
    model = CostModel(LLAMA8B, H100, Profile("H100", "bf16", row_block=4, per_leftover_row_s=leftover_s))
    starts = [300, 1024, 77, 5000, 1]
    rows = [SeqShape(s, 1, True, False) for s in starts]
    assert model.decode_step_seconds(len(starts), sum(starts)) == model.step_seconds(rows)


_calls = {}


def _schedule_calls(run):
    sim, _ = run
    return sum(_calls.get(id(r.scheduler), 0) for r in sim.replicas)


@pytest.fixture(autouse=True)
def _count_schedule_calls(monkeypatch):
    from tokenmill.engine.scheduler import Scheduler

    schedule = Scheduler.schedule

    def counting(self):
        _calls[id(self)] = _calls.get(id(self), 0) + 1
        return schedule(self)

    monkeypatch.setattr(Scheduler, "schedule", counting)
    yield
    _calls.clear()
