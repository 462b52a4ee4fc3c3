"""Round-to-nearest per contiguous group: the baseline GPTQ and AWQ are measured against, and
AWQ's last step (on its scaled, clipped weights)."""

from __future__ import annotations

import torch

from tokenmill.model.packed import GroupQuantWeight
from tokenmill.quantize.grid import QuantGrid


def rtn(w: torch.Tensor, grid: QuantGrid, group_size: int, lo: torch.Tensor | None = None,
        hi: torch.Tensor | None = None, mse: bool = False) -> GroupQuantWeight:
    """w [out, in]; lo/hi [out, groups]: clipped ranges (AWQ), else each group's min/max, or
    (mse) the shrunk range with the least rounding error (QuantGrid.fit_mse)."""
    out, inp = w.shape
    groups = inp // group_size
    g = w.float().reshape(out * groups, group_size)
    if mse and lo is None:
        scale, zero = grid.fit_mse(g)
    else:
        scale, zero = grid.fit(g, None if lo is None else lo.reshape(-1), None if hi is None else hi.reshape(-1))
    q = grid.quantize(g, scale, zero).reshape(out, inp)
    return GroupQuantWeight(
        q.to(torch.int32), scale.reshape(out, groups), zero.reshape(out, groups).to(torch.int32),
        torch.arange(inp) // group_size, grid.bits,
    )
