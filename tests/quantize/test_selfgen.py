"""Calibration text sampled from the model itself (quantize/selfgen.py), on the tiny random
Llama: the batched decode over its paged pool computes what a full prefill computes, and the
samples are reproducible, distinct, and reach the quantizer."""

from __future__ import annotations

import pytest
import torch

from tests.model.real import sequence_logits
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.quantize.pipeline import float_weights, quantize_model
from tokenmill.quantize.selfgen import sample_sequences, start_token
from tokenmill.quantize.spec import QuantizeSpec


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")[1]


def test_greedy_samples_are_the_prefill_argmax(tiny):
    """Temperature 0: every token is the argmax of the logits a whole-sequence prefill gives at
    the position before it, so the decode path (slots, block tables, context lengths) is right."""
    w = float_weights(tiny.weights)
    seqs = sample_sequences(tiny.config, w, tiny.tokenizer, 3 * 23, seq_len=24, batch=2, temperature=0)
    assert len(seqs) == 3 and all(len(s) == 24 for s in seqs)
    m = LlamaForCausalLM(tiny.config, w, torch.float32, max_positions=64)
    logits = sequence_logits(m, seqs[0])
    assert logits[:-1].argmax(-1).tolist() == seqs[0][1:]
    assert seqs[0] == seqs[2]  # greedy from the same start token, in another batch


def test_samples_are_seeded_and_distinct(tiny):
    w = float_weights(tiny.weights)
    a = sample_sequences(tiny.config, w, tiny.tokenizer, 4 * 11, seq_len=12, batch=4, seed=1)
    b = sample_sequences(tiny.config, w, tiny.tokenizer, 4 * 11, seq_len=12, batch=4, seed=1)
    c = sample_sequences(tiny.config, w, tiny.tokenizer, 4 * 11, seq_len=12, batch=4, seed=2)
    assert a == b and a != c
    assert all(s[0] == start_token(tiny.tokenizer) for s in a)
    assert len({tuple(s) for s in a}) == 4


def test_generated_tokens_join_the_calibration(tiny):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    plain = quantize_model(tiny.config, tiny.weights, tiny.tokenizer, QuantizeSpec(method="gptq", group_size=32, calib_generate=0), text)
    more = quantize_model(tiny.config, tiny.weights, tiny.tokenizer,
                          QuantizeSpec(method="gptq", group_size=32, calib_generate=300), text)
    assert more.calibration_tokens >= plain.calibration_tokens + 300
