"""AWQ (Lin et al., 2023): a few input channels carry large activations, and the weights that
multiply them matter most. Scaling those weight columns up by s (and the inputs down by s,
folded into the op that produces them) shrinks their relative rounding error. Per group of
linears sharing one input, s = mean|x|^alpha, alpha chosen on a grid by the output error of the
quantized linears; then per (row, group) a clip of the weight range chosen the same way.

Written from the paper. Simplifications (and why): the loss is the sharing linears' own outputs
rather than the whole attention/MLP block's (cheaper, and those outputs are what the scale
moves); the scale uses activations only (the paper's form)."""

from __future__ import annotations

import torch

from tokenmill.quantize.grid import QuantGrid


def search_scale(x: torch.Tensor, w: torch.Tensor, grid: QuantGrid, group_size: int, n_grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales s [in] for the linears stacked in w [out, in] over inputs x
    [n, in]: the s minimising || x W^T - (x/s) Q(W s)^T ||^2. alpha = 0 gives s = 1 (plain RTN)."""
    x, w = x.float(), w.float()
    x_mean = x.abs().mean(0)
    ref = x @ w.t()
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for r in range(n_grid):
        s = x_mean.pow(r / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales: no overall gain or shrink
        wq = grid.fake_groups(w * s, group_size) / s
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s
    return best_s


def search_clip(x: torch.Tensor, w: torch.Tensor, grid: QuantGrid, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) clipped ranges (lo, hi), each [out, groups]: the group's min/max times
    the ratio in (1 - max_shrink, 1] that minimises that group's share of the output error."""
    out, inp = w.shape
    groups = inp // group_size
    wg = w.float().reshape(out, groups, group_size)
    xg = x.float().reshape(x.shape[0], groups, group_size).transpose(0, 1)  # [groups, n, G]
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    best_err = torch.full((out, groups), float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r in range(int(max_shrink * n_grid)):
        ratio = 1 - r / n_grid
        lo, hi = lo0 * ratio, hi0 * ratio
        clipped = torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None])
        flat = clipped.reshape(out * groups, group_size)
        scale, zero = grid.fit(flat, lo.reshape(-1), hi.reshape(-1))
        diff = (grid.fake(flat, scale, zero).reshape(out, groups, group_size) - wg).transpose(0, 1)  # [groups, out, G]
        err = torch.bmm(xg, diff.transpose(1, 2)).pow(2).mean(1).t()  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi
