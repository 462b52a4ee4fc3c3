"""A higher-priority request's prefill runs in a step of its own: lower-priority running
requests sit that step out (keeping their blocks) and decode again the step after, so an
interactive request's first token costs what its prompt costs, not what a full batch step
costs. While it then decodes, lower-priority work takes at most lower_priority_step_tokens
per step, in turns, so the step in progress when the next one arrives is short. Scheduler
alone first, then the same on a real engine (tiny llama)."""

from __future__ import annotations

from tests.engine.helpers import assert_pool_whole, make_request
from tokenmill import EngineConfig, SamplingParams
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler

BATCH, CHAT = 100, 0  # the Batch API's priority and the default one


def _req(request_id, prompt, priority, max_tokens):
    r = make_request(request_id, prompt, max_tokens)
    r.priority = priority
    return r


def _decode(sched: Scheduler, out) -> None:
    sched.update(out, {c.request.request_id: [3] for c in out.chunks if c.samples})


def _decoding_batch(num_rows=6, budget=64, max_tokens=40, cap=None) -> tuple[Scheduler, list]:
    sched = Scheduler(KVCacheManager(128, 4, enable_caching=False), max_num_seqs=16,
                      max_num_batched_tokens=budget, max_model_len=128, lower_priority_step_tokens=cap)
    batch = [_req(f"b{i}", [i + 10] * 5, BATCH, max_tokens) for i in range(num_rows)]
    for r in batch:
        sched.add_request(r)
    for _ in range(10):  # prefill (in chunks when the budget is small), then decode a little
        _decode(sched, sched.schedule())
        if all(r.num_computed_tokens > r.num_prompt_tokens for r in batch):
            break
    assert all(r.num_computed_tokens > r.num_prompt_tokens for r in batch)
    return sched, batch


def test_interactive_prefill_gets_a_step_without_batch_rows_which_resume_next_step():
    sched, batch = _decoding_batch()
    held = {r.request_id: list(r.block_ids) for r in batch}
    computed = {r.request_id: r.num_computed_tokens for r in batch}
    chat = _req("chat", [7] * 9, CHAT, max_tokens=4)
    sched.add_request(chat)

    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("chat", 9)]
    assert not out.preempted and sched.num_preemptions == 0
    # Left out, not preempted: still running, blocks and computed KV untouched.
    assert all(r.status is RequestStatus.RUNNING for r in batch)
    assert {r.request_id: list(r.block_ids) for r in batch} == held
    _decode(sched, out)
    assert {r.request_id: r.num_computed_tokens for r in batch} == computed
    assert chat.num_output_tokens == 1  # the first token came out of that step

    out = sched.schedule()  # the chat request decodes now: everyone rides along again
    assert sorted(c.request.request_id for c in out.chunks) == sorted(["chat"] + list(held))
    assert all(c.num_tokens == 1 for c in out.chunks)
    _decode(sched, out)
    assert all(r.num_computed_tokens == computed[r.request_id] + 1 for r in batch)


def test_a_chunked_interactive_prompt_keeps_batch_rows_out_of_every_chunk():
    sched, batch = _decoding_batch(budget=16)
    sched.add_request(_req("chat", [7] * 40, CHAT, max_tokens=4))
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append([(c.request.request_id, c.num_tokens) for c in out.chunks])
        _decode(sched, out)
    assert chunks == [[("chat", 16)], [("chat", 16)], [("chat", 8)]]
    out = sched.schedule()
    assert {c.request.request_id for c in out.chunks} == {"chat"} | {r.request_id for r in batch}


def test_batch_requests_waiting_for_a_seat_are_not_admitted_beside_an_interactive_prefill():
    sched, batch = _decoding_batch(num_rows=4, max_tokens=3)
    later = [_req(f"late{i}", [i + 50] * 5, BATCH, 8) for i in range(3)]
    for r in later:
        sched.add_request(r)
    sched.add_request(_req("chat", [7] * 6, CHAT, max_tokens=4))
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["chat"]
    assert all(r.status is RequestStatus.WAITING for r in later)
    _decode(sched, out)
    out = sched.schedule()  # seats were free all along: the batch is admitted the step after
    assert {r.request_id for r in later} <= {c.request.request_id for c in out.chunks}


def test_equal_priorities_still_prefill_beside_decoding_rows():
    # One priority (offline, or a server without batch work): a new request's prefill shares
    # the step with every decoding row, as before; the floor changes nothing here.
    sched, batch = _decoding_batch()
    sched.add_request(_req("same", [7] * 9, BATCH, max_tokens=4))
    out = sched.schedule()
    assert {c.request.request_id for c in out.chunks} == {"same"} | {r.request_id for r in batch}


def test_higher_priority_decoding_rows_still_run_beside_a_lower_priority_prefill():
    sched, batch = _decoding_batch(num_rows=2)
    sched.add_request(_req("chat", [7] * 3, CHAT, max_tokens=20))
    _decode(sched, sched.schedule())  # the chat prefill, alone
    sched.add_request(_req("b-new", [9] * 5, BATCH, 4))
    out = sched.schedule()  # a batch prefill does not hold back the chat (nor its own priority)
    assert {c.request.request_id for c in out.chunks} == {"chat", "b0", "b1", "b-new"}


def test_intermittent_interactive_traffic_does_not_starve_the_batch():
    sched, batch = _decoding_batch(num_rows=6, max_tokens=60)
    steps = sat_out = prefill_steps = 0
    chats = []
    while sched.has_unfinished:
        steps += 1
        assert steps < 500, "the batch never finished"
        if steps % 3 == 0 and len(chats) < 15:  # an interactive request every third step
            chats.append(_req(f"chat{len(chats)}", [7, 8, len(chats)], CHAT, max_tokens=5))
            sched.add_request(chats[-1])
        out = sched.schedule()
        ran = {c.request for c in out.chunks}
        chat_prefill = any(c.request.priority == CHAT and c.prompt for c in out.chunks)
        prefill_steps += chat_prefill
        running_batch = [r for r in batch if r.status is RequestStatus.RUNNING]
        # Batch rows sit out exactly the steps with an interactive prefill in them.
        if chat_prefill:
            assert not ran & set(running_batch)
            sat_out += bool(running_batch)
        else:
            assert set(running_batch) <= ran
        _decode(sched, out)
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 60 for r in batch)
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 5 for r in chats)
    assert prefill_steps == len(chats) == 15 and sat_out == 15
    assert sched.num_preemptions == 0
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_lower_priority_rows_take_turns_within_the_cap_while_interactive_work_decodes():
    sched, batch = _decoding_batch(num_rows=10, cap=4)  # one priority so far: all 10 ran every step
    chat = _req("chat", [7] * 5, CHAT, max_tokens=7)
    sched.add_request(chat)
    _decode(sched, sched.schedule())  # the chat prefill, alone
    ran = []
    while not chat.is_finished:
        out = sched.schedule()
        assert out.chunks[0].request is chat and not out.preempted
        ran.append([c.request.request_id for c in out.chunks[1:]])
        _decode(sched, out)
    assert len(ran) == 6 and all(len(step) == 4 for step in ran)
    # Turns: every row within any three steps in a row (10 rows, 4 a step), and equal shares.
    for i in range(len(ran) - 2):
        assert set(ran[i] + ran[i + 1] + ran[i + 2]) == {r.request_id for r in batch}
    counts = [sum(step.count(r.request_id) for step in ran) for r in batch]
    assert max(counts) - min(counts) <= 1
    # The interactive request is gone: one priority again, no cap.
    assert {c.request.request_id for c in sched.schedule().chunks} == {r.request_id for r in batch}


def test_lower_priority_prefill_is_chunked_to_the_cap_and_one_priority_is_never_capped():
    sched, batch = _decoding_batch(num_rows=2, cap=3)
    assert all(r.num_output_tokens >= 1 for r in batch)  # 2 rows x 5 prompt tokens ran uncapped
    chat = _req("chat", [7] * 3, CHAT, max_tokens=30)
    sched.add_request(chat)
    _decode(sched, sched.schedule())
    late = _req("late", [9] * 7, BATCH, max_tokens=4)
    sched.add_request(late)
    steps = []
    while late.num_output_tokens == 0:
        out = sched.schedule()
        steps.append(sorted((c.request.request_id, c.num_tokens) for c in out.chunks if c.request is not chat))
        assert sum(c.num_tokens for c in out.chunks if c.request is not chat) <= 3
        _decode(sched, out)
    # 2 decoding rows and 7 prompt tokens in turns of 3: the prompt is chunked, nobody is skipped twice.
    assert sum(n for step in steps for rid, n in step if rid == "late") == 7
    assert all({rid for rid, _ in a + b} >= {"b0", "b1"} for a, b in zip(steps, steps[1:]))


def test_a_single_priority_is_never_capped():
    sched, batch = _decoding_batch(num_rows=8, cap=1)
    out = sched.schedule()
    assert len(out.chunks) == 8
    sched.add_request(_req("same", [7] * 9, BATCH, max_tokens=4))
    assert sched.schedule().num_batched_tokens == 8 + 9


def test_intermittent_interactive_traffic_with_a_cap_still_finishes_the_batch():
    sched, batch = _decoding_batch(num_rows=6, max_tokens=30, cap=2)
    steps = 0
    while sched.has_unfinished:
        steps += 1
        assert steps < 400, "the batch never finished"
        if steps % 4 == 0 and steps < 120:
            sched.add_request(_req(f"chat{steps}", [7, 8, steps], CHAT, max_tokens=3))
        out = sched.schedule()
        _decode(sched, out)
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 30 for r in batch)
    assert sched.num_preemptions == 0 and not sched._ran_at
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_real_engine_interactive_prefill_runs_alone_and_the_batch_is_unchanged(tiny_models):
    from tokenmill.build import build_engine

    _, loaded = tiny_models("llama")
    config = EngineConfig.from_flat(model="tiny", num_kv_blocks=128, max_num_seqs=8, lower_priority_step_tokens=4)
    batch_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, i + 8, 20 + i] for i in range(6)]

    def run(with_chat: bool) -> dict[str, list[int]]:
        engine = build_engine(config, loaded)
        for i, p in enumerate(prompts):
            engine.add_request(f"batch-{i}", p, batch_params, priority=BATCH)
        engine.step()
        engine.step()
        results, chat_step = {}, None
        if with_chat:
            chat_prompt = [9, 10, 11, 12, 13, 14, 15]
            engine.add_request("chat", chat_prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            chat_step = engine.step()
            # Only the chat's prompt was computed in that step, and it produced the first token.
            assert engine.stats.last_step_tokens == len(chat_prompt)
            assert [o.request_id for o in chat_step] == ["chat"]
            assert len(chat_step[0].outputs[0].token_ids) == 1
            # Then the chat decodes beside 4 batch rows (the cap), the other 2 the step after.
            resumed = [{o.request_id for o in engine.step()} for _ in range(2)]
            assert engine.stats.last_step_tokens == 1 + 4
            assert all("chat" in ids and len(ids) == 5 for ids in resumed)
            assert resumed[0] | resumed[1] == {"chat"} | {f"batch-{i}" for i in range(6)}
        while engine.has_unfinished:
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = list(out.outputs[0].token_ids)
        assert_pool_whole(engine)
        assert engine.scheduler.num_preemptions == 0
        return results

    alone, beside = run(False), run(True)
    assert len(beside.pop("chat")) == 4
    # Sitting a step out changes nothing in what a batch row computes.
    assert beside == alone and all(len(t) == 12 for t in alone.values())
