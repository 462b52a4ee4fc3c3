"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's squared output error, H = 2 X^T X over the calibration inputs X.

Written from the paper: the inverse Hessian is used through the upper Cholesky factor of H^-1
(numerically stable, and row i of it is exactly the update for column i once columns < i are
fixed); updates inside a block of `block` columns are applied eagerly, the rest of the matrix
is updated once per block ("lazy batch" updates, the same arithmetic in bigger GEMMs)."""

from __future__ import annotations

import torch

from tokenmill.model.packed import GroupQuantWeight
from tokenmill.quantize.grid import QuantGrid


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n over calibration rows x [n, in], in float64 for the sums."""
    x = x.double()
    return (2.0 / x.shape[0]) * (x.t() @ x)


def gptq(
    w: torch.Tensor, h: torch.Tensor, grid: QuantGrid, group_size: int, act_order: bool = False,
    damp: float = 0.01, block: int = 128,
) -> GroupQuantWeight:
    """w [out, in], h [in, in] -> the quantized weight. act_order: columns in order of
    decreasing H diagonal (most-activated first), groups formed in that order (g_idx)."""
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={inp}")
    W = w.double().clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0  # inputs never active: their columns cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(inp)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(inp, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros(out, inp, dtype=torch.int32)
    groups = inp // group_size
    scales = torch.zeros(out, groups)
    zeros = torch.zeros(out, groups, dtype=torch.int32)
    scale = zero = None
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        W1 = W[:, i1:i2]  # a view: updates below land in W, so group fits see them
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # a group's grid from its columns as updated so far
                scale, zero = grid.fit(W[:, col : col + group_size].float())
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero.to(torch.int32)
            wcol = W1[:, i].float()
            q = grid.quantize(wcol, scale, zero)
            Q[:, col] = q.to(torch.int32)
            err = (W1[:, i] - ((q - zero) * scale).double()) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(inp) // group_size)[inverse]  # group of each original column
    return GroupQuantWeight(Q[:, inverse].contiguous(), scales, zeros, g_idx, grid.bits)
