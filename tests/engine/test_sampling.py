"""Sampling params, the batched sampler, stop conditions, logprobs, abort and detokenization."""

import math

import pytest
import torch

from tests.tiny import VOCAB, tiny_tokenizer
from tokenmill import LLM, SamplingParams
from tokenmill.engine.detokenize import IncrementalDetokenizer
from tokenmill.model.sampler import Sampler
from tokenmill.step import SampleInputs, ScheduledSeq


@pytest.fixture(scope="module")
def llm(tiny_models):
    _, loaded = tiny_models("llama")
    return LLM("tiny", loaded=loaded, num_kv_blocks=128, max_num_batched_tokens=64, block_size=8, debug_checks=True)


def _pool_whole(llm):
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def _req(i, prompt=(1, 2, 3), output=(), **params):
    """A sampled row of a step record (the sampler sees nothing else of a request)."""
    p = SamplingParams(**params)
    return ScheduledSeq([0], 0, [1], request_id=f"r{i}",
                        sample=SampleInputs(p, len(output), prompt_token_ids=list(prompt), output_token_ids=list(output)))


def test_sampler_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    sampler = Sampler(seed=0)
    counts = torch.zeros(5)
    for i in range(4000):
        counts[sampler(logits, [_req(i, temperature=1.0)])[0].token_id] += 1
    expected = logits.softmax(-1)[0]
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.9, -2.0]] * 3)
    sampler = Sampler(seed=1)
    seen = [set(), set(), set()]
    for i in range(300):
        reqs = [_req(3 * i, top_k=2), _req(3 * i + 1, top_p=0.6), _req(3 * i + 2, min_p=0.5)]
        for j, r in enumerate(sampler(logits, reqs)):
            seen[j].add(r.token_id)
    assert seen[0] == {0, 1}  # top-2
    assert seen[1] == {0, 1}  # p(0) ~ 0.45 < 0.6, so the second token is kept, no more
    assert seen[2] == {0, 1}  # tokens under half the max probability are dropped


def test_penalties_change_exactly_the_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    req = _req(0, prompt=[0, 1], temperature=0, repetition_penalty=2.0)
    out = logits.clone()
    Sampler()._apply_penalties(out, [req])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    req = _req(1, output=[2, 2, 3], temperature=0, frequency_penalty=0.5, presence_penalty=0.25)
    out = logits.clone()
    Sampler()._apply_penalties(out, [req])
    assert out.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25]]


def test_seeded_sampling_is_reproducible_in_any_crowd(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], p)[0].outputs[0].token_ids
    crowd = llm.generate(
        [[9, 9, 9], [5, 6, 7, 8], [3, 4], [5, 6, 7, 8]],
        [SamplingParams(temperature=1.0, max_tokens=16), p, SamplingParams(temperature=0.7, seed=7, max_tokens=16), p],
    )
    assert crowd[1].outputs[0].token_ids == alone
    assert crowd[3].outputs[0].token_ids == alone
    other_seed = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone
    _pool_whole(llm)


def test_n_completions_share_the_prompt(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    _pool_whole(llm)


def test_greedy_top_k_1_and_tiny_top_p_equal_greedy(llm):
    prompt = [[11, 12, 13, 14, 15]]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    k1 = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True))[0].outputs[0]
    p0 = llm.generate(prompt, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert greedy.token_ids == k1.token_ids == p0.token_ids


def test_stop_strings_cut_exactly(llm):
    prompt = "The quick brown fox"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = full.text
    assert len(text) > 10
    stop = text[5:8]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    out = cut.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True, ignore_eos=True)
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    _pool_whole(llm)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = [[20, 21, 22, 23]]
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    stop_id = full[3]
    first = full.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], min_tokens=first + 3)
    )[0].outputs[0]
    assert stop_id not in out.token_ids[: first + 2]
    assert len(out.token_ids) >= first + 3
    _pool_whole(llm)


def test_logprobs_of_greedy_token_are_the_top(llm):
    out = llm.generate([[30, 31, 32]], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        assert lp.sampled.token_id == tok
        assert lp.top[0].token_id == tok and lp.sampled.logprob == pytest.approx(lp.top[0].logprob)
        assert [x.logprob for x in lp.top] == sorted((x.logprob for x in lp.top), reverse=True)
        assert sum(math.exp(x.logprob) for x in lp.top) <= 1.0 + 1e-5


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("keep", [1, 2, 3] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("gone", [4, 5, 6] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort_request("gone")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.abort_request("keep")
    assert not engine.has_unfinished
    _pool_whole(llm)


def test_bad_prompts_are_refused_cleanly(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 500], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[VOCAB + 5]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished
    _pool_whole(llm)


def test_incremental_detokenization_never_splits_utf8():
    tok = tiny_tokenizer()
    text = "héllo wörld, ça va? 日本語のテキスト 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[])
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.text)
        assert "\ufffd" not in detok.text
    assert detok.text == text
    assert all(seen[i].startswith(seen[i - 1]) for i in range(1, len(seen)))


def test_streamed_text_with_stop_strings_is_never_taken_back():
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_token_ids=[], stop=["lazy"])
    shown = ""
    for t in ids:
        stopped = detok.add_token(t)
        visible = detok.text if stopped else detok.visible_text
        assert visible.startswith(shown)
        shown = visible
        if stopped:
            break
    assert shown == "The quick brown fox jumps over the "
