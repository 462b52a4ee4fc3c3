"""Weight-only quantized linears on torch's own CPU kernels, built from float weights or from
GGUF blocks (gguf_blocks.py: only GGUF data needs the `gguf` package).

Which format runs which kernel (see `make_linear`):

| weight                  | quantization | module        | kernel                                      |
|-------------------------|--------------|---------------|---------------------------------------------|
| float                   | none / auto  | FloatLinear   | F.linear in `dtype`                         |
| float or any GGUF type  | int4         | Int4Linear    | aten._weight_int4pack_mm_for_cpu, group-wise|
| float or any GGUF type  | int8         | Int8Linear    | aten._weight_int8pack_mm, per output row    |
| float or any GGUF type  | fp8          | Fp8Linear     | torch._scaled_mm, e4m3 W8A8 (model/fp8.py)  |
| GGUF Q4_0 / Q4_1        | auto         | Int4Linear    | the file's own int4 values, exactly         |
| GGUF Q8_0               | auto         | Int8Linear    | the file's int8 values and per-32 scales    |
| GGUF other types        | auto         | FloatLinear   | dequantized with gguf.quants                |
| GGUF any type           | none         | FloatLinear   | dequantized with gguf.quants                |

Prompt rows: torch's int4/int8 CPU kernels are tuned for a few rows. From 16 rows (int4) or
2 rows (grouped int8) a bfloat16 GEMM over the dequantized weights is 1.5-4x faster (figures in
docs/benchmarks.md), so a linear built with dense_rows="prompt" also keeps that bfloat16 copy.
Which rows use it is decided by what they are, never by how many share the step, so a request's
tokens do not depend on its batch (DESIGN.md): rows from the step's first prompt row on
(step_context.py; the runner puts prompt tokens last) run the copy, the rows before it
(generated tokens) the kernel. The LM head is built with dense_rows="all": all its rows run the
copy. The copy costs 2 bytes per weight; the engine caps it (dense_weight_limit_gb).

Both kernels run their activations in bfloat16: with float32 activations torch takes a
slow fallback path (measured 10-40x slower than bfloat16 on an AVX-512 CPU, slower even than a
float32 F.linear), so the quantized modules cast x to bfloat16 and the result back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.fp8 import Fp8Linear
from tokenmill.model.layers import FloatLinear
from tokenmill.model.step_context import current_step

if TYPE_CHECKING:  # not at run time: GGUF blocks exist only where `gguf` read a file
    from tokenmill.model.gguf_blocks import QuantizedWeight

KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# Which rows a quantized linear runs through a bfloat16 dense copy (module docstring): none (no
# copy kept), the step's prompt rows, or all rows (the LM head).
DenseRows = Literal["none", "prompt", "all"]


# --- modules ---


def int4_group_size(in_features: int, requested: int) -> int:
    """The requested group size, or the largest smaller one the kernel takes that divides
    in_features (e.g. 128 -> 64 for SmolLM2's 576): a model-wide setting should not fail on
    one odd layer width."""
    fits = [g for g in INT4_GROUP_SIZES if g <= requested and in_features % g == 0]
    if not fits:
        raise ValueError(
            f"int4 group size {requested}: none of {INT4_GROUP_SIZES} up to it divides in_features={in_features}"
        )
    return max(fits)


class WeightOnlyLinear(nn.Module):
    """What the int4 and int8 linears share: their quantized kernel (`_kernel`) for some rows, the
    dense copy, when they keep one, for the others (module docstring)."""

    def __init__(self, bias, out_dtype, dense_rows: DenseRows):
        super().__init__()
        if dense_rows not in ("none", "prompt", "all"):
            raise ValueError(f"dense_rows must be 'none', 'prompt' or 'all', got {dense_rows!r}")
        self.out_dtype, self.dense_rows = out_dtype, dense_rows
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))
        # Set by the subclass when kept. Not persistent: weight_nbytes counts what a decode step
        # reads, and decode reads the quantized weights.
        self.register_buffer("dense", None, persistent=False)

    @property
    def keeps_dense(self) -> bool:
        return self.dense_rows != "none"

    def kernel_rows(self, rows: int) -> int:
        """How many leading rows run the quantized kernel; the rest run the dense copy."""
        if self.dense is None:
            return rows
        if self.dense_rows == "all":
            return 0
        first = current_step().first_prompt_row
        return rows if first is None else min(first, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(KERNEL_DTYPE)
        rows = x.shape[0]
        k = self.kernel_rows(rows)
        if k == rows:
            y = self._kernel(xs).to(self.out_dtype)
        elif k == 0:
            y = F.linear(xs, self.dense).to(self.out_dtype)
        else:
            y = torch.cat([self._kernel(xs[:k]).to(self.out_dtype), F.linear(xs[k:], self.dense).to(self.out_dtype)])
        return y if self.bias is None else y + self.bias

    def _kernel(self, xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int4Linear(WeightOnlyLinear):
    """y = x @ W.T with W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group_size:
    that is _weight_int4pack_mm_for_cpu's zero-point convention (checked in tests)."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bias, out_dtype,
        dense_rows: DenseRows = "none",
    ):
        super().__init__(bias, out_dtype, dense_rows)
        out, inp = q.shape
        if group_size not in INT4_GROUP_SIZES or inp % group_size:
            raise ValueError(f"int4 needs a group size in {INT4_GROUP_SIZES} dividing in_features={inp}")
        self.in_features, self.out_features, self.group_size = inp, out, group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        # [groups, out, 2] as the kernel wants: scale and zero of group g for output row n.
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        self.register_buffer("scales_and_zeros", sz)
        if self.keeps_dense:  # the kernel's own arithmetic: (q - 8) * scale + zero, with its bf16 scales
            g = (q.float() - 8).reshape(out, inp // group_size, group_size)
            w = (g * sz[..., 0].t().float()[..., None] + sz[..., 1].t().float()[..., None]).reshape(out, inp)
            self.dense = w.to(KERNEL_DTYPE)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias, group_size: int, out_dtype, dense_rows: DenseRows = "none") -> "Int4Linear":
        # Asymmetric min/max per group: q = round((w - min) / s), stored zero = min + 8s.
        out, inp = w.shape
        group_size = int4_group_size(inp, group_size)
        g = w.float().reshape(out, inp // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        return cls(q, scale, lo + 8 * scale, group_size, bias, out_dtype, dense_rows)

    @classmethod
    def from_gguf(cls, w: QuantizedWeight, bias, out_dtype, dense_rows: DenseRows = "none") -> "Int4Linear":
        q, d, m = w.int4_values()
        return cls(q, d, m + 8 * d, 32, bias, out_dtype, dense_rows)  # d*q + m == (q-8)*d + (m+8d)

    def _kernel(self, xs: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xs, self.packed, self.group_size, self.scales_and_zeros)


class Int8Linear(WeightOnlyLinear):
    """y = x @ W.T with symmetric int8 weights, W[n, k] = q[n, k] * scale[g, n], g = k // group_size.

    _weight_int8pack_mm only knows one scale per output row, so a group size below in_features
    runs one kernel call per input group and sums them: used for GGUF Q8_0, whose per-32 scales
    are worth keeping (requantizing the tied LM head of SmolLM2 per row moves its logits by up
    to 0.5, enough to flip greedy tokens). Float checkpoints quantized on load use per-row."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, group_size: int, bias, out_dtype, dense_rows: DenseRows = "none"
    ):
        super().__init__(bias, out_dtype, dense_rows)
        out, inp = q.shape
        if inp % group_size:
            raise ValueError(f"int8 group size {group_size} does not divide in_features={inp}")
        self.out_features, self.in_features, self.group_size = out, inp, group_size
        groups = inp // group_size
        # [groups, out, group_size]: each group's slice is a contiguous matrix for the kernel.
        qg = q.to(torch.int8).reshape(out, groups, group_size).transpose(0, 1).contiguous()
        self.register_buffer("qweight", qg)
        self.register_buffer("scales", scale.reshape(groups, out).to(KERNEL_DTYPE).contiguous())
        if self.keeps_dense:  # q * scale with the kernel's bf16 scales
            w = (qg.float() * self.scales.float()[..., None]).transpose(0, 1).reshape(out, inp)
            self.dense = w.to(KERNEL_DTYPE)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias, out_dtype, dense_rows: DenseRows = "none") -> "Int8Linear":
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        # Round the scale to the kernel's dtype first so q is chosen against the scale it runs with.
        scale = scale.to(KERNEL_DTYPE).float()
        q = (w / scale[:, None]).round().clamp(-127, 127)
        return cls(q, scale[None, :], w.shape[1], bias, out_dtype, dense_rows)

    @classmethod
    def from_gguf(cls, w: QuantizedWeight, bias, out_dtype, dense_rows: DenseRows = "none") -> "Int8Linear":
        q, d = w.int8_values()
        return cls(q, d.t(), 32, bias, out_dtype, dense_rows)

    def _kernel(self, xs: torch.Tensor) -> torch.Tensor:
        groups = self.qweight.shape[0]
        if groups == 1:
            return torch._weight_int8pack_mm(xs, self.qweight[0], self.scales[0])
        xg = xs.view(-1, groups, self.group_size)
        y = torch.zeros(xs.shape[0], self.out_features, dtype=torch.float32)
        for g in range(groups):  # accumulate in float32: bf16 partial sums would lose bits
            y += torch._weight_int8pack_mm(xg[:, g].contiguous(), self.qweight[g], self.scales[g])
        return y


def quantized_kernel(weight: "torch.Tensor | QuantizedWeight", quantization: str) -> type | None:
    """Int4Linear or Int8Linear when make_linear runs `weight` on that kernel (table above),
    else None (float or fp8)."""
    if quantization == "int4":
        return Int4Linear
    if quantization == "int8":
        return Int8Linear
    if quantization == "auto" and not isinstance(weight, torch.Tensor):
        return {"int4": Int4Linear, "int8": Int8Linear}.get(weight.kernel_format)
    return None


def make_linear(
    weight: "torch.Tensor | QuantizedWeight",
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    quantization: str,
    group_size: int,
    dense_rows: DenseRows = "none",
) -> nn.Module:
    """A module computing x @ weight.T + bias, [N, in] -> [N, out] in `dtype` (table above).
    `dense_rows`: which rows int4/int8 linears run through a bfloat16 copy (docstring above)."""
    kernel = quantized_kernel(weight, quantization)
    if not isinstance(weight, torch.Tensor):  # GGUF blocks
        if quantization == "auto" and kernel is not None:
            return kernel.from_gguf(weight, bias, dtype, dense_rows)
        weight = weight.dequantize()
    if kernel is Int8Linear:
        return Int8Linear.from_float(weight, bias, dtype, dense_rows)
    if kernel is Int4Linear:
        return Int4Linear.from_float(weight, bias, group_size, dtype, dense_rows)
    if quantization == "fp8":
        return Fp8Linear(weight, bias, dtype)
    if quantization not in ("none", "auto"):
        raise ValueError(f"unknown quantization {quantization!r}")
    return FloatLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
