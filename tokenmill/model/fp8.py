"""FP8 W8A8 linears through torch._scaled_mm (Hopper's fp8 tensor cores; torch also has a CPU
path, which is how the tests run it here).

Weights: e4m3 with one scale per output channel, quantized once at load. Activations: e4m3
with one scale per token, computed every call (dynamic), so no calibration data is needed.
e4m3's largest value is 448: each row is scaled so that its largest magnitude lands there.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row [rows, 1]) with x ~= values * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 needs dimensions divisible by 16, got {tuple(weight.shape)}")
        w8, w_scale = quantize_rows(weight)
        self.weight = nn.Parameter(w8, requires_grad=False)  # [out, in] e4m3
        self.weight_scale = nn.Parameter(w_scale.reshape(1, -1), requires_grad=False)  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype = dtype

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
