"""GPTQ, AWQ and round-to-nearest on synthetic layers whose inputs have the structure real
activations have (correlated channels, a few large ones), judged by the layer's output error."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quantize import awq
from tokenmill.quantize.gptq import gptq, hessian
from tokenmill.quantize.grid import QuantGrid
from tokenmill.quantize.rtn import rtn
from tokenmill.quantize.spec import QuantizeSpec


def layer(out=96, inp=128, n=1024, seed=0, outliers=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + torch.eye(inp)  # correlated channels
    x = torch.randn(n, inp, generator=g) @ mix
    if outliers:
        x[:, :outliers] *= 20  # a few channels carry large activations, as in LLMs
    w = torch.randn(out, inp, generator=g) * 0.05
    return x, w


def out_err(x, w, wq):
    return (x @ (wq - w).t()).pow(2).mean().item()


def test_rtn_grid_and_round_trip():
    x, w = layer()
    q = rtn(w, QuantGrid(4), 32)
    assert q.q.min() >= 0 and q.q.max() <= 15 and q.group_size == 32
    assert (q.dequantize() - w).abs().max() <= q.scale.max() / 2 + 1e-6  # within half a step
    assert torch.equal(q.dequantize(), QuantGrid(4).fake_groups(w, 32))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    x, w = layer()
    grid = QuantGrid(bits)
    e_rtn = out_err(x, w, rtn(w, grid, 32).dequantize())
    e_gptq = out_err(x, w, gptq(w, hessian(x), grid, 32).dequantize())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_act_order_keeps_channel_order():
    """Act-order quantizes columns in a permuted order; the result is in the original order
    (each column's value is close to its own weight) with g_idx naming each column's group."""
    x, w = layer()
    x[:, 100:] *= 5  # high-Hessian columns at the end: act-order moves them first
    q = gptq(w, hessian(x), QuantGrid(4), 32, act_order=True)
    assert q.group_size is None  # groups formed in permuted order
    assert sorted(q.g_idx[100:].tolist()) == [0] * 28  # the 28 largest columns make group 0 with 4 others
    assert torch.bincount(q.g_idx).tolist() == [32] * 4
    per_col = (q.dequantize() - w).abs().mean(0)
    assert per_col.max() < 0.5 * w.abs().mean()  # a misplaced column would be off by ~|w|
    e_plain = out_err(x, w, gptq(w, hessian(x), QuantGrid(4), 32).dequantize())
    assert out_err(x, w, q.dequantize()) < 1.5 * e_plain


def test_gptq_dead_inputs_are_zeroed():
    x, w = layer()
    x[:, 5] = 0
    q = gptq(w, hessian(x), QuantGrid(4), 32)
    assert (q.dequantize()[:, 5].abs() <= q.scale[:, 0]).all()


def test_awq_scale_beats_rtn_with_outlier_channels():
    x, w = layer(outliers=4)
    grid = QuantGrid(3)
    s = awq.search_scale(x[:512], w, grid, 32)
    assert s[:4].mean() > s[4:].mean()  # the large channels' weights are scaled up
    e_rtn = out_err(x, w, grid.fake_groups(w, 32))
    e_awq = out_err(x, w, grid.fake_groups(w * s, 32) / s)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_clip_never_worse_than_no_clip():
    x, w = layer(seed=3)
    w[0, 0] = 1.0  # an outlier weight stretches its group's range
    grid = QuantGrid(3)
    lo, hi = awq.search_clip(x[:256], w, grid, 32)
    q = rtn(w, grid, 32, lo, hi)
    assert out_err(x, w, q.dequantize()) <= out_err(x, w, rtn(w, grid, 32).dequantize()) * 1.0001


def test_sym_grid_zero_is_the_midpoint_and_v1_zeros_start_at_1():
    w = torch.randn(8, 64).abs()  # all positive: an asymmetric zero would be 0
    assert (rtn(w, QuantGrid(4, sym=True), 32).zero == 8).all()
    assert (rtn(w, QuantGrid(4), 32).zero == 0).any()
    assert (rtn(w, QuantSpecGrid("gptq"), 32).zero >= 1).all()


def QuantSpecGrid(fmt):  # noqa: N802
    return QuantizeSpec(method="rtn", bits=4, group_size=32, format=fmt).grid


@pytest.mark.parametrize("kw,match", [
    ({"method": "sparsegpt"}, "--method"), ({"bits": 5}, "--bits"), ({"format": "awq", "bits": 3}, "format awq"),
    ({"format": "compressed-tensors", "bits": 3}, "4 or 8"), ({"method": "awq", "act_order": True}, "act-order"),
])
def test_spec_refuses_bad_flags(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizeSpec(**kw)


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_clip_never_rounds_worse_than_the_full_range(bits):
    """The clip search keeps the full range unless a shrunk one rounds the group with less
    (importance-weighted) error, so no row gets worse, and rows with an outlier get better."""
    _, w = layer()
    w[::7, 3] *= 8  # an outlier in some groups: clipping it pays
    grid = QuantGrid(bits)
    g = w.reshape(-1, 32)
    importance = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.1
    full = grid._err(g, *grid.fit(g), importance)
    clipped = grid._err(g, *grid.fit_mse(g, importance), importance)
    assert (clipped <= full + 1e-9).all()
    assert clipped.sum() < 0.97 * full.sum()


def test_gptq_clip_search_lowers_output_error():
    x, w = layer(outliers=4)
    h = hessian(x)
    plain = out_err(x, w, gptq(w, h, QuantGrid(3), 32).dequantize())
    searched = out_err(x, w, gptq(w, h, QuantGrid(3), 32, mse=True).dequantize())
    assert searched < 0.9 * plain
