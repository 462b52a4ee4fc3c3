"""Faults inside the engine: one request's sampling or grammar failing ends that request alone
(finish_reason "error") while the batch keeps its tokens; an executor failing for everyone is
the engine's fault; aborting a request while the pool thrashes; the async loop dying fails
every caller instead of leaving them waiting. Every scenario ends with the pool whole and
the gauges at zero."""

from __future__ import annotations

import asyncio

import pytest

from tests.engine.helpers import assert_pool_whole
from tokenmill import EngineConfig, SamplingParams
from tokenmill.build import build_async_engine, build_engine
from tokenmill.engine.async_engine import EngineDeadError, RequestFailedError
from tokenmill.model.sampler import Sampler
from tokenmill.sampling import StructuredOutput
from tokenmill.structured.compiler import GrammarMatcher

POISON_SEED = 4242  # the marker of the one request whose sampling fails
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34]]


def _engine(tiny_models, **config):
    _, loaded = tiny_models("llama")
    config.setdefault("num_kv_blocks", 64)
    return build_engine(EngineConfig.from_flat(model="tiny", **config), loaded)


def _run(engine, max_steps: int = 2000) -> dict:
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return finals
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("the engine did not finish")


def assert_idle_and_whole(engine) -> None:
    assert not engine.has_unfinished
    assert_pool_whole(engine)
    s = engine.stats
    assert (s.num_running, s.num_waiting, s.kv_blocks_used, s.kv_usage) == (0, 0, 0, 0.0), s


def _poison_sampling(monkeypatch, after_tokens: int) -> list[int]:
    """Sampling raises for the poisoned request once it has `after_tokens` tokens; returns a
    list that counts the failures."""
    real = Sampler.__call__
    failures = []

    def sample(self, logits, requests, bitmask=None):
        for seq in requests:
            if seq.sample.params.seed == POISON_SEED and seq.sample.num_output_tokens >= after_tokens:
                failures.append(seq.request_id)
                raise RuntimeError("injected sampling fault")
        return real(self, logits, requests, bitmask)

    monkeypatch.setattr(Sampler, "__call__", sample)
    return failures


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_sampling_fault_fails_only_its_request(tiny_models, monkeypatch):
    reference = _engine(tiny_models)
    for i, p in enumerate(PROMPTS):
        reference.add_request(f"r{i}", p, GREEDY)
    expected = {rid: out.outputs[0].token_ids for rid, out in _run(reference).items()}

    engine = _engine(tiny_models)
    failures = _poison_sampling(monkeypatch, after_tokens=3)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.add_request("bad", [40, 41, 42], SamplingParams(temperature=0.8, seed=POISON_SEED, max_tokens=12))
    finals = _run(engine)
    bad = finals.pop("bad").outputs[0]
    assert failures and bad.finish_reason == "error"
    # The kind of fault, never its text (which may quote internals).
    assert "generation" in bad.stop_reason and "injected" not in bad.stop_reason
    assert len(bad.token_ids) == 3  # what it had before the fault
    # The others kept every token, and the same ones: the retry ran them alone.
    assert {rid: out.outputs[0].token_ids for rid, out in finals.items()} == expected
    assert all(out.outputs[0].finish_reason == "length" for out in finals.values())
    assert_idle_and_whole(engine)
    engine.add_request("after", PROMPTS[0], GREEDY)
    assert _run(engine)["after"].outputs[0].token_ids == expected["r0"]
    assert_idle_and_whole(engine)


def test_failed_completion_fails_its_group(tiny_models, monkeypatch):
    """n > 1: one completion failing fails the whole request; its siblings are aborted."""
    engine = _engine(tiny_models)
    _poison_sampling(monkeypatch, after_tokens=2)  # seed + j: only the first child carries the seed
    engine.add_request("group", [5, 6, 7], SamplingParams(n=3, seed=POISON_SEED, max_tokens=30, ignore_eos=True))
    engine.add_request("plain", [8, 9], GREEDY)
    finals = _run(engine)
    reasons = [c.finish_reason for c in finals["group"].outputs]
    assert reasons[0] == "error" and set(reasons[1:]) == {"abort"}, reasons
    assert finals["plain"].outputs[0].finish_reason == "length"
    assert_idle_and_whole(engine)


def test_executor_failing_for_everyone_is_the_engines_fault(tiny_models, monkeypatch):
    engine = _engine(tiny_models)

    def broken(self, logits, requests, bitmask=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Sampler, "__call__", broken)
    for i, p in enumerate(PROMPTS[:2]):
        engine.add_request(f"r{i}", p, GREEDY)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


def test_grammar_fault_fails_only_its_request(tiny_models, monkeypatch):
    real = GrammarMatcher.advance
    advanced = []

    def advance(self, token_id):
        advanced.append(token_id)
        if len(advanced) > 2:
            raise RuntimeError("injected grammar fault")
        return real(self, token_id)

    monkeypatch.setattr(GrammarMatcher, "advance", advance)
    engine = _engine(tiny_models)
    engine.grammars.compile(StructuredOutput(regex="[a-z ]{1,40}"))  # ready before the step loop
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.add_request("constrained", [40, 41], SamplingParams(
        temperature=0, max_tokens=20, structured=StructuredOutput(regex="[a-z ]{1,40}")))
    finals = _run(engine)
    c = finals.pop("constrained").outputs[0]
    assert c.finish_reason == "error" and "grammar" in c.stop_reason
    assert len(c.token_ids) == 3  # the token its grammar choked on is reported, nothing after
    assert all(out.outputs[0].finish_reason == "length" for out in finals.values())
    assert all(len(out.outputs[0].token_ids) == 12 for out in finals.values())
    assert_idle_and_whole(engine)


def test_grammar_mask_fault_fails_only_its_request(tiny_models, monkeypatch):
    def fill_bitmask(self, bitmask, row):
        raise RuntimeError("injected mask fault")

    monkeypatch.setattr(GrammarMatcher, "fill_bitmask", fill_bitmask)
    engine = _engine(tiny_models)
    engine.grammars.compile(StructuredOutput(regex="[a-z]+"))
    engine.add_request("plain", PROMPTS[0], GREEDY)
    engine.add_request("constrained", [40, 41], SamplingParams(
        temperature=0, max_tokens=8, structured=StructuredOutput(regex="[a-z]+")))
    finals = _run(engine)
    assert finals["constrained"].outputs[0].finish_reason == "error"
    assert finals["constrained"].outputs[0].token_ids == []
    assert finals["plain"].outputs[0].finish_reason == "length"
    assert_idle_and_whole(engine)


def test_abort_while_preempting(tiny_models):
    """A pool too small for the batch: requests are preempted and recomputed; aborting a
    preempted one (its blocks already given back) and a running one leaves the pool whole."""
    engine = _engine(tiny_models, num_kv_blocks=8, max_num_batched_tokens=64)  # 128 tokens for all
    params = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [10 + i] * 20, params)
    aborted: set[str] = set()
    finals = {}
    for _ in range(3000):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        sched = engine.scheduler
        if not aborted:
            preempted = [r for r in sched.waiting if r.num_preemptions > 0]
            if preempted:
                victim = preempted[0].request_id
                assert not preempted[0].block_ids  # preempted: nothing held
                running = next(r.request_id for r in sched.running)
                for rid in (victim, running):
                    out = engine.abort_request(rid)
                    assert out.finished and out.outputs[0].finish_reason == "abort"
                    aborted.add(rid)
                engine.check_invariants()
    assert len(aborted) == 2, "no preemption happened: the pool is not small enough"
    assert engine.stats.num_preemptions > 0
    assert set(finals) == {f"r{i}" for i in range(4)} - aborted
    assert all(len(out.outputs[0].token_ids) == 90 for out in finals.values())
    assert_idle_and_whole(engine)
    assert engine.scheduler.requests == {}  # forgotten, nothing left


def test_async_loop_death_fails_every_caller(tiny_models):
    _, loaded = tiny_models("llama")
    engine = build_async_engine(EngineConfig.from_flat(model="tiny", num_kv_blocks=64), loaded)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        gens = [engine.generate([5, 6, 7, i], params, f"s{i}") for i in range(3)]
        for g in gens:
            await anext(g)  # every stream has started

        def die():
            raise RuntimeError("injected engine fault")

        engine.engine.step = die  # the next step kills the loop
        for g in gens:
            with pytest.raises(EngineDeadError):
                async for _ in g:
                    pass
        assert engine.dead
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([1, 2], params, "late"))
        with pytest.raises(EngineDeadError):
            await engine.call(lambda e: e.reset_prefix_cache())

    asyncio.run(asyncio.wait_for(main(), 30))
    engine.shutdown()
    assert_pool_whole(engine.engine)
    s = engine.stats
    assert (s.num_running, s.num_waiting, s.kv_blocks_used) == (0, 0, 0)


def test_async_request_failure_is_raised_to_its_caller_only(tiny_models, monkeypatch):
    _, loaded = tiny_models("llama")
    engine = build_async_engine(EngineConfig.from_flat(model="tiny", num_kv_blocks=64), loaded)
    _poison_sampling(monkeypatch, after_tokens=2)

    async def main():
        async def consume(prompt, params, rid):
            out = None
            async for out in engine.generate(prompt, params, rid):
                pass
            return out

        bad = SamplingParams(temperature=0.5, seed=POISON_SEED, max_tokens=50, ignore_eos=True)
        good = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        results = await asyncio.gather(consume([1, 2, 3], bad, "bad"), consume([4, 5, 6], good, "good"),
                                       return_exceptions=True)
        assert isinstance(results[0], RequestFailedError), results[0]
        assert results[1].outputs[0].finish_reason == "length"
        out = await consume([7, 8], good, "after")  # the engine serves on
        assert out.outputs[0].finish_reason == "length"

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not engine.dead
    engine.shutdown()
    assert_pool_whole(engine.engine)


def test_a_slow_consumer_gets_the_tokens_made_before_its_request_failed(tiny_models, monkeypatch):
    _, loaded = tiny_models("llama")
    engine = build_async_engine(EngineConfig.from_flat(model="tiny", num_kv_blocks=64), loaded)
    _poison_sampling(monkeypatch, after_tokens=3)

    async def main():
        bad = SamplingParams(temperature=0.5, seed=POISON_SEED, max_tokens=50, ignore_eos=True)
        stream = engine.generate([1, 2, 3], bad, "bad")
        seen = [await stream.__anext__()]
        await asyncio.sleep(1.0)  # the next tokens and the failure queue up behind a slow consumer
        with pytest.raises(RequestFailedError):
            async for out in stream:
                seen.append(out)
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(seen[-1].outputs[0].token_ids) == 3  # every token made before the fault was delivered
    engine.shutdown()
    assert_pool_whole(engine.engine)


def test_gauges_true_after_every_add_abort_and_finish(tiny_models):
    """No gauge waits for the next step: a slow step must not hide a queue, and an engine that
    goes idle must not keep the last busy figures."""
    engine = _engine(tiny_models)
    s = engine.stats
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], SamplingParams(n=2, max_tokens=12))
    assert (s.num_running, s.num_waiting) == (0, 3)  # before any step
    engine.step()
    assert (s.num_running, s.num_waiting) == (3, 0) and s.kv_blocks_used > 0
    engine.abort_request("b")
    assert s.num_running == 1 and s.kv_blocks_used > 0
    engine.abort_request("a")  # the engine is idle now: nothing will step again
    assert_idle_and_whole(engine)
