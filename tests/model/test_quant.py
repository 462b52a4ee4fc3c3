"""Quantized linears against float linears over the same (dequantized) weights.

Tolerances: the kernels round activations to int8 per block of 32 (quant.int8_activations) and
run them over the exact weight values, so outputs agree with a float32 matmul of those rounded
activations to float32 summation error (1e-4 of the output scale here; the kernel's own bound
is checked in test_qkernels.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from tokenmill.model.layers import FloatLinear, weight_nbytes
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.quant import Int4Linear, Int8Linear, int8_activations, make_linear

OUT, IN = 96, 128


def gguf_weight(qtype: Q, seed: int = 0) -> QuantizedWeight:
    w = np.random.default_rng(seed).standard_normal((OUT, IN)).astype(np.float32)
    return QuantizedWeight(quantize(w, qtype), qtype, (OUT, IN))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def x(rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(1))


def xq(rows: int = 5) -> torch.Tensor:
    """x() as the kernels round it."""
    return int8_activations(x(rows))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_values_reconstruct_exactly(qtype):
    w = gguf_weight(qtype)
    q, d, m = w.int4_values()
    assert q.min() >= 0 and q.max() <= 15
    rebuilt = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    assert torch.equal(rebuilt, w.dequantize())


def test_int4_kernel_zero_point_convention():
    # W = (q - 8) * scale + zero: build the module from known q/scale/zero and compare (the
    # module keeps scale and min = zero - 8 * scale in float16).
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (OUT, IN), generator=g, dtype=torch.int32)
    scale = torch.rand(OUT, IN // 32, generator=g) + 0.5
    zero = torch.randn(OUT, IN // 32, generator=g)
    lin = Int4Linear(q, scale, zero, 32, None, torch.float32)
    s = scale.half().float().repeat_interleave(32, 1)
    m = (zero.double() - 8 * scale.double()).half().float().repeat_interleave(32, 1)
    w = q * s + m
    assert torch.equal(lin.dequantized(), w)
    assert rel_err(lin(x()), xq() @ w.t()) < 1e-4


@pytest.mark.parametrize("qtype,cls", [(Q.Q4_1, Int4Linear), (Q.Q4_0, Int4Linear), (Q.Q8_0, Int8Linear)])
@pytest.mark.parametrize("rows", [1, 7])
def test_gguf_auto_stays_quantized_and_matches_float(qtype, cls, rows):
    w = gguf_weight(qtype)
    bias = torch.randn(OUT)
    lin = make_linear(w, bias, torch.float32, "auto", 32)
    assert isinstance(lin, cls)
    ref = torch.nn.functional.linear(xq(rows), w.dequantize(), bias)
    out = lin(x(rows))
    assert out.dtype == torch.float32 and out.shape == (rows, OUT)
    assert rel_err(out, ref) < 1e-4


def test_gguf_none_dequantizes_exactly():
    w = gguf_weight(Q.Q4_1)
    lin = make_linear(w, None, torch.float32, "none", 32)
    assert isinstance(lin, FloatLinear)
    assert torch.equal(lin.weight, w.dequantize())
    lin16 = make_linear(w, None, torch.bfloat16, "none", 32)
    assert lin16.weight.dtype == torch.bfloat16 and lin16(x().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("quantization,cls,tol", [("int8", Int8Linear, 2e-2), ("int4", Int4Linear, 0.15)])
@pytest.mark.parametrize("group_size", [32, 64])
def test_float_quantized_on_load(quantization, cls, tol, group_size):
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(3))
    lin = make_linear(w, None, torch.float32, quantization, group_size)
    assert isinstance(lin, cls)
    assert rel_err(lin(x()), x() @ w.t()) < tol


def test_float_auto_is_plain_linear():
    w = torch.randn(OUT, IN)
    lin = make_linear(w, None, torch.float32, "auto", 32)
    assert isinstance(lin, FloatLinear) and torch.equal(lin(x()), x() @ w.t())


def test_group_size_falls_back_to_one_that_divides():
    lin = make_linear(torch.randn(OUT, 96), None, torch.float32, "int4", 64)  # 96 % 64 != 0
    assert lin.group_size == 32
    with pytest.raises(ValueError, match="group size"):
        make_linear(torch.randn(OUT, IN), None, torch.float32, "int4", 16)


def test_weight_nbytes():
    w = torch.randn(OUT, IN)
    assert weight_nbytes(make_linear(w, None, torch.float32, "none", 32)) == OUT * IN * 4
    # int4: half a byte per weight plus fp16 (scale, min) per group of 32
    assert weight_nbytes(make_linear(w, None, torch.float32, "int4", 32)) == OUT * IN // 2 + OUT * IN // 32 * 4
    # int8 per row: one byte per weight plus one fp16 scale per row
    assert weight_nbytes(make_linear(w, None, torch.float32, "int8", 32)) == OUT * IN + OUT * 2
    # fp8: one byte per weight plus a float32 scale per output row
    assert weight_nbytes(make_linear(w, None, torch.bfloat16, "fp8", 32)) == OUT * IN + OUT * 4
    # a module shared twice counts once
    shared = make_linear(w, None, torch.float32, "none", 32)
    assert weight_nbytes(torch.nn.ModuleList([shared, shared])) == OUT * IN * 4


def test_weight_nbytes_of_a_model_counts_a_tied_head_not_the_embedding(tiny_models):
    from tokenmill.model.llama import LlamaForCausalLM

    for arch, tied in (("llama", False), ("qwen2", True)):
        _, loaded = tiny_models(arch)
        model = LlamaForCausalLM(loaded.config, loaded.weights)
        cfg = loaded.config
        linears = sum(v.numel() for k, v in loaded.weights.items() if k.endswith("proj.weight") or k.endswith("proj.bias"))
        norms = sum(v.numel() for k, v in loaded.weights.items() if k.endswith("norm.weight"))
        head = cfg.vocab_size * cfg.hidden_size  # untied: lm_head; tied: the table, read whole
        assert cfg.tie_word_embeddings == tied
        assert weight_nbytes(model) == 4 * (linears + norms + head)


STACKS = {
    "Q4_1": [Q.Q4_1, Q.Q4_1, Q.Q4_1],
    "Q8_0": [Q.Q8_0, Q.Q8_0, Q.Q8_0],
    "float": [None, None, None],
    "mixed types": [Q.Q4_1, Q.Q8_0, Q.Q4_1],
    "float and GGUF": [Q.Q4_1, None, Q.Q4_1],
}


@pytest.mark.parametrize("quantization", ["auto", "int4", "int8", "none"])
@pytest.mark.parametrize("stack", STACKS)
def test_stacked_projection_equals_its_parts_side_by_side(stack, quantization):
    # q/k/v and gate/up run as one linear over stacked weights: each output column must be what
    # its own linear gives, in every weight format; weights that can't stack stay apart.
    from tokenmill.model.layers import ConcatLinear
    from tokenmill.model.llama import stacked_linear

    qtypes = STACKS[stack]
    weights = [gguf_weight(q, seed=i) if q else torch.randn(OUT, IN, generator=torch.Generator().manual_seed(i)) for i, q in enumerate(qtypes)]
    biases = [torch.randn(OUT, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    factory = lambda w, b: make_linear(w, b, torch.float32, quantization, 32)  # noqa: E731
    fused = stacked_linear(factory, weights, biases)
    apart = torch.cat([factory(w, b)(x()) for w, b in zip(weights, biases)], dim=-1)
    assert isinstance(fused, ConcatLinear) == (stack in ("mixed types", "float and GGUF"))
    got = fused(x())
    assert got.shape == (5, 3 * OUT)
    torch.testing.assert_close(got, apart, rtol=1e-5, atol=1e-5)
