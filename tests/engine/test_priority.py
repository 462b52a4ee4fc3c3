"""Priority scheduling: admission by (priority, arrival), preemption lowest priority first, and
interactive work displacing batch work; then the same on a real engine."""

from __future__ import annotations

from tests.engine.helpers import assert_pool_whole, make_request
from tokenmill import EngineConfig, SamplingParams
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler


def _prio(request_id, prompt, priority, max_tokens=8):
    r = make_request(request_id, prompt, max_tokens)
    r.priority = priority
    return r


def _decode(sched: Scheduler, out) -> None:
    sched.update(out, {c.request.request_id: [1] for c in out.chunks if c.samples})


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    for rid, prio in [("batch-a", 5), ("batch-b", 5), ("mid", 1), ("interactive", 0), ("batch-c", 5)]:
        sched.add_request(_prio(rid, [1, 2, 3], prio))
    assert [r.request_id for r in sched.waiting] == ["interactive", "mid", "batch-a", "batch-b", "batch-c"]
    # One priority's prefill per step (lower ones sit it out, see Scheduler._step_floor): the
    # interactive request first, alone; then mid beside it; the batch waits for a seat.
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["interactive"]
    _decode(sched, out)
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["interactive", "mid"]
    assert [r.request_id for r in sched.waiting] == ["batch-a", "batch-b", "batch-c"]


def test_memory_pressure_preempts_the_lowest_priority_even_with_more_work_done():
    # 5 blocks of 4 tokens; each request needs 4 blocks by its end: both can't finish together.
    sched = Scheduler(KVCacheManager(5, 4, enable_caching=False), 4, 64, max_model_len=64)
    low = _prio("low", [1] * 7, priority=9, max_tokens=8)  # more computed tokens: the old victim rule spares it
    high = _prio("high", [2] * 4, priority=0, max_tokens=10)
    sched.add_request(low)
    sched.add_request(high)
    preempted = []
    for _ in range(20):
        out = sched.schedule()
        preempted += out.preempted
        _decode(sched, out)
        if not sched.has_unfinished:
            break
    assert preempted and all(r is low for r in preempted)
    assert high.num_preemptions == 0 and high.status is RequestStatus.FINISHED_LENGTH
    assert low.status is RequestStatus.FINISHED_LENGTH and low.num_output_tokens == 8
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_equal_priorities_keep_the_least_work_lost_rule():
    sched = Scheduler(KVCacheManager(5, 4, enable_caching=False), 4, 64, max_model_len=64)
    long = _prio("long", [1] * 7, priority=3, max_tokens=8)
    short = _prio("short", [2] * 4, priority=3, max_tokens=10)
    sched.add_request(long)
    sched.add_request(short)
    preempted = []
    while sched.has_unfinished:
        out = sched.schedule()
        preempted += out.preempted
        _decode(sched, out)
    assert preempted and preempted[0] is short


def test_interactive_request_displaces_running_batch_work_for_a_seat():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    batch = [_prio(f"b{i}", [i + 1] * 3, priority=10, max_tokens=30) for i in range(4)]
    for r in batch:
        sched.add_request(r)
    _decode(sched, sched.schedule())
    assert {r.request_id for r in sched.running} == {"b0", "b1"}
    sched.add_request(_prio("chat", [7, 7, 7], priority=0))
    out = sched.schedule()
    ran = {c.request.request_id for c in out.chunks}
    # One batch request makes room (the latest arrival among equal work), and goes back to
    # the queue ahead of later batch requests; none of the waiting ones is admitted now. The
    # one that keeps its seat sits out the chat's prefill step and decodes again the next.
    assert "chat" in ran and [r.request_id for r in out.preempted] == ["b1"]
    assert [r.request_id for r in sched.waiting] == ["b1", "b2", "b3"]
    assert ran == {"chat"}
    _decode(sched, out)
    assert {c.request.request_id for c in sched.schedule().chunks} == {"chat", "b0"}


def test_equal_priority_never_displaces():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64)
    sched.add_request(_prio("first", [1, 2], priority=0, max_tokens=30))
    _decode(sched, sched.schedule())
    sched.add_request(_prio("second", [3, 4], priority=0))
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["first"] and not out.preempted


def test_real_engine_admits_interactive_ahead_of_a_waiting_batch(tiny_models):
    from tokenmill.build import build_engine

    _, loaded = tiny_models("llama")
    engine = build_engine(EngineConfig.from_flat(model="tiny", num_kv_blocks=128, max_num_seqs=2), loaded)
    batch = SamplingParams(max_tokens=6, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"batch-{i}", [5, 6, 7, i + 8], batch, priority=10)
    engine.step()
    engine.step()
    engine.add_request("chat", [9, 10, 11], SamplingParams(max_tokens=4, ignore_eos=True))
    finished_order = []
    first_token_step = {}
    step = 0
    while engine.has_unfinished:
        step += 1
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first_token_step:
                first_token_step[out.request_id] = step
            if out.finished:
                finished_order.append(out.request_id)
                assert len(out.outputs[0].token_ids) == (4 if out.request_id == "chat" else 6)
    # The chat request got its first token in the very next step, before any waiting batch
    # request started, and finished first.
    assert first_token_step["chat"] == 1
    waiting_batch = [f"batch-{i}" for i in range(2, 6)]
    assert all(first_token_step[r] > 1 for r in waiting_batch)
    assert finished_order[0] == "chat"
    assert sorted(finished_order) == sorted(["chat"] + [f"batch-{i}" for i in range(6)])
    assert engine.scheduler.num_preemptions >= 1  # a running batch request gave up its seat
    assert_pool_whole(engine)
