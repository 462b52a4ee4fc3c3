"""FP8 W8A8 linears through torch._scaled_mm (Hopper's fp8 tensor cores; torch also has a CPU
path, which is how the tests run it here).

Weights: e4m3 with one scale per output channel, quantized once at load, or as an FP8
checkpoint stores them (Fp8Weight). Activations: e4m3 with one scale per token, computed every
call (dynamic), so no calibration data is needed; a checkpoint's static input scale is not used
(per-token scales are at least as precise). e4m3's largest value is 448: each row is scaled so
that its largest magnitude lands there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row [rows, 1]) with x ~= values * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@dataclass
class Fp8Weight:
    """An e4m3 weight as a checkpoint stores it (compressed-tensors `float-quantized`, the FP8
    checkpoints vLLM serves): W[n, k] = values[n, k] * scale[n]. A per-tensor scale is stored
    here repeated per row, so that q/k/v and gate/up stack exactly."""

    values: torch.Tensor  # [out, in] float8_e4m3fn
    scale: torch.Tensor  # [out] float32

    def __post_init__(self):
        if self.values.dtype != FP8 or self.values.dim() != 2 or self.scale.shape != (self.values.shape[0],):
            raise ValueError(f"fp8 weight: values {self.values.dtype} {list(self.values.shape)}, "
                             f"scale {list(self.scale.shape)} (want e4m3 [out, in] and [out])")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scale.numel() * 4

    @property
    def kernel_format(self) -> None:
        return None  # no integer kernel: Fp8Linear runs it (quant.make_linear)

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scale[:, None]

    @staticmethod
    def stacked(weights: list) -> "Fp8Weight | None":
        if not all(isinstance(w, Fp8Weight) and w.shape[1] == weights[0].shape[1] for w in weights):
            return None
        return Fp8Weight(torch.cat([w.values for w in weights]), torch.cat([w.scale for w in weights]))


class Fp8Linear(nn.Module):
    def __init__(self, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        """w8: [out, in] e4m3; w_scale: [out] float32 (W = w8 * w_scale per row)."""
        super().__init__()
        out_features, in_features = w8.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 needs dimensions divisible by 16, got {tuple(w8.shape)}")
        self.weight = nn.Parameter(w8, requires_grad=False)  # [out, in] e4m3
        self.weight_scale = nn.Parameter(w_scale.float().reshape(1, -1), requires_grad=False)  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Fp8Linear":
        """Quantized once here: one scale per output row."""
        w8, w_scale = quantize_rows(weight)
        return cls(w8, w_scale, bias, dtype)

    @classmethod
    def from_checkpoint(cls, weight: Fp8Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> "Fp8Linear":
        """The checkpoint's own e4m3 values and scales, as they are."""
        return cls(weight.values, weight.scale, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x8, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        # mat2 must be column-major: the [out, in] row-major weight, transposed, is exactly that.
        # CUDA's row-wise scaled matmul writes bf16 only; other dtypes are cast from it.
        out_dtype = torch.bfloat16 if x.is_cuda else self.dtype
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=out_dtype)
        out = out.to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], -1)
