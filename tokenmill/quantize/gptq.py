"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time and spread each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's squared output error, H = 2 X^T X over the calibration inputs X.

Written from the paper: the inverse Hessian is used through the upper Cholesky factor of H^-1
(stable in float32 once damped, and row i of it is exactly the update for column i once columns < i are
fixed); updates inside a block of `block` columns are applied eagerly, the rest of the matrix
is updated once per block ("lazy batch" updates, the same arithmetic in bigger GEMMs)."""

from __future__ import annotations

import torch

from tokenmill.model.packed import GroupQuantWeight
from tokenmill.quantize.grid import QuantGrid
from tokenmill.quantize.threads import torch_threads


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n over calibration rows x [n, in], in float64 for the sums."""
    x = x.double()
    return (2.0 / x.shape[0]) * (x.t() @ x)


def gptq(
    w: torch.Tensor, h: torch.Tensor, grid: QuantGrid, group_size: int, act_order: bool = False,
    damp: float = 0.01, block: int = 128, mse: bool = False,
) -> GroupQuantWeight:
    """w [out, in], h [in, in] -> the quantized weight. act_order: columns in order of
    decreasing H diagonal (most-activated first), groups formed in that order (g_idx). mse: each
    group's range shrunk to the least rounding error weighted by diag(H) (QuantGrid.fit_mse)."""
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
    # H^-1 = L^-T L^-1 from the Cholesky factor (torch's cholesky_inverse is several times slower
    # on CPU than one triangular solve and a product), then H^-1's upper factor.
    L = torch.linalg.cholesky(H.float())
    Linv = torch.linalg.solve_triangular(L, torch.eye(inp), upper=False)
    U = torch.linalg.cholesky(Linv.t() @ Linv, upper=True)

    # The column loop runs in float32 (H was summed in float64; damped, float32 is stable), on
    # W transposed so that each weight column is one contiguous row.
    Wt = W.t().float().contiguous()
    diag = torch.diag(H).float()
    Qt = torch.zeros(inp, out)
    groups = inp // group_size
    scales = torch.zeros(groups, out)
    zeros = torch.zeros(groups, out)
    maxq = float(grid.maxq)
    with torch_threads(1):  # thousands of tiny ops: thread hand-offs would cost more than they save
        for i1 in range(0, inp, block):
            i2 = min(i1 + block, inp)
            W1 = Wt[i1:i2]  # a view: updates below land in Wt, so group fits see them
            E1 = torch.empty_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % group_size == 0:  # a group's grid from its columns as updated so far
                    wg = Wt[col : col + group_size].t()
                    scale, zero = grid.fit_mse(wg, diag[col : col + group_size]) if mse else grid.fit(wg)
                    scales[col // group_size], zeros[col // group_size] = scale, zero
                w = W1[i]
                q = torch.round(w / scale + zero).clamp_(0, maxq)
                err = (w - (q - zero) * scale).div_(U1[i, i])
                W1[i:].addr_(U1[i, i:], err, alpha=-1)
                E1[i] = err
                Qt[col] = q
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(inp) // group_size)[inverse]  # group of each original column
    q = Qt[inverse].t().to(torch.int32).contiguous()
    return GroupQuantWeight(q, scales.t().contiguous(), zeros.t().to(torch.int32).contiguous(), g_idx, grid.bits)

