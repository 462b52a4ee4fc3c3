"""The integer grid one group of weights is rounded onto: b bits, symmetric or with a zero point,
scales rounded to float16 first because that is what the checkpoint stores (so q, and GPTQ's
error compensation, are chosen against the scale the model will run with)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantGrid:
    bits: int
    sym: bool = False
    # GPTQ v1 files store zero - 1 and cannot hold 0 (model/packed/gptq.py)
    min_zero: int = 0

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def fit(self, w: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
        """Per-row (scale, zero) for w [rows, G]; lo/hi override the row range (clip search)."""
        lo = torch.minimum(w.amin(-1) if lo is None else lo, torch.zeros(()))
        hi = torch.maximum(w.amax(-1) if hi is None else hi, torch.zeros(()))
        if self.sym:
            hi = torch.maximum(-lo, hi)
            scale = (2 * hi / self.maxq).clamp(min=1e-8).half().float()
            zero = torch.full_like(scale, 1 << (self.bits - 1))
        else:
            scale = ((hi - lo) / self.maxq).clamp(min=1e-8).half().float()
            zero = (-lo / scale).round().clamp(self.min_zero, self.maxq)
        return scale, zero

    def fit_mse(self, w: torch.Tensor, importance: torch.Tensor | None = None, steps: int = 20,
                max_shrink: float = 0.5):
        """Per-row (scale, zero) for w [rows, G] with the range shrunk towards zero by the ratio in
        (1 - max_shrink, 1] whose rounding error is least: a group's extreme weights cost every
        other weight of the group a coarser step, and clipping them is often cheaper. The error
        is weighted per column by `importance` [G] (GPTQ passes diag(H): how much each input
        moves the output), else plain squared error."""
        lo0 = torch.minimum(w.amin(-1), torch.zeros(()))
        hi0 = torch.maximum(w.amax(-1), torch.zeros(()))
        best_scale, best_zero = self.fit(w, lo0, hi0)
        best = self._err(w, best_scale, best_zero, importance)
        for r in range(1, int(max_shrink * steps)):
            ratio = 1 - r / steps
            scale, zero = self.fit(w, lo0 * ratio, hi0 * ratio)
            err = self._err(w, scale, zero, importance)
            better = err < best
            best = torch.where(better, err, best)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def _err(self, w, scale, zero, importance):
        e = (self.fake(w, scale, zero) - w).pow(2)
        return (e if importance is None else e * importance).sum(-1)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """w [rows, ...] -> integer q (as float) with scale/zero broadcast over trailing dims."""
        shape = (-1,) + (1,) * (w.dim() - 1)
        return (w / scale.view(shape) + zero.view(shape)).round().clamp(0, self.maxq)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (w.dim() - 1)
        return (self.quantize(w, scale, zero) - zero.view(shape)) * scale.view(shape)

    def fake_groups(self, w: torch.Tensor, group_size: int) -> torch.Tensor:
        """Round-to-nearest of every contiguous group of w [out, in], dequantized."""
        out, inp = w.shape
        g = w.reshape(out * (inp // group_size), group_size)
        scale, zero = self.fit(g)
        return self.fake(g, scale, zero).reshape(out, inp)
