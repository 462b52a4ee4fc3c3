"""Weight-only quantized linears on tokenmill's own CPU kernels (qkernels.py), built from float
weights or from GGUF blocks (gguf_blocks.py: only GGUF data needs the `gguf` package).

Which format runs which kernel (see `make_linear`):

| weight                  | quantization | module        | kernel                                      |
|-------------------------|--------------|---------------|---------------------------------------------|
| float                   | none / auto  | FloatLinear   | F.linear in `dtype`                         |
| float or any GGUF type  | int4         | Int4Linear    | qkernels int4_linear, scale + min per group |
| float or any GGUF type  | int8         | Int8Linear    | qkernels int8_linear, per output row        |
| float or any GGUF type  | fp8          | Fp8Linear     | torch._scaled_mm, e4m3 W8A8 (model/fp8.py)  |
| FP8 checkpoint (e4m3)   | auto / fp8   | Fp8Linear     | the checkpoint's e4m3 values and scales     |
| GGUF Q4_0 / Q4_1        | auto         | Int4Linear    | the file's own int4 values and scales       |
| GGUF Q8_0               | auto         | Int8Linear    | the file's int8 values and per-32 scales    |
| GGUF other types        | auto         | FloatLinear   | dequantized with gguf.quants                |
| GGUF any type           | none         | FloatLinear   | dequantized with gguf.quants                |

Every row, prompt or generated, one or 512 of them, runs the same kernel, whose result for a
row does not depend on the other rows (qkernels.py): a request's tokens do not depend on its
batch, and a draft verified in a chunk equals the token decoded alone (DESIGN.md). Weights are
kept packed, the size of the GGUF data (4.5 or 8.5 bits per weight), with float16 scales; no
dense copy. Activations are cast to float32 and rounded to two int8 passes per block of 32
inside the kernel (int8_activations); the result is float32, cast back to out_dtype.

Where the C++ kernel cannot be built, the linears dequantize their weights in torch for each
call (slow, for correctness only; qkernels logs it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model import qkernels
from tokenmill.model.fp8 import Fp8Linear, Fp8Weight
from tokenmill.model.layers import FloatLinear

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # not at run time: GGUF blocks exist only where `gguf` read a file
    from tokenmill.model.gguf_blocks import QuantizedWeight

SCALE_DTYPE = torch.float16  # the scales' dtype: GGUF's own, and 2 bytes like it
INT4_BLOCK = 32  # int4 group sizes are multiples of it: the packing's unit
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the sizes `int4_group_size` picks among for float weights
KERNEL_COLS = 8  # the kernel reads the scales of 8 output columns at once (column_groups)


# --- packing ---


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in/2] uint8 in GGUF's nibble order: byte j of each
    32-block holds input j (low nibble) and input j+16 (high nibble)."""
    out, inp = q.shape
    blocks = q.to(torch.uint8).reshape(out, inp // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, inp // 2).contiguous()


def column_groups(t: torch.Tensor) -> torch.Tensor:
    """Scales [out, groups] -> the kernel's layout [ceil(out/8), groups, 8]: the 8 output
    columns the kernel computes together side by side per group, one 16-byte load (zeros pad
    the last column group)."""
    out, groups = t.shape
    pad = t.new_zeros(-out % KERNEL_COLS, groups)
    return torch.cat([t, pad]).reshape(-1, KERNEL_COLS, groups).transpose(1, 2).contiguous()


def from_column_groups(t: torch.Tensor, out: int) -> torch.Tensor:
    """column_groups' inverse: [out, groups]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:out]


def int4_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> the int4 kernel's [ceil(out/8), in/8, 32] uint8: per group of 8
    output columns and 8 inputs 8t..8t+7, byte 4j+i holds input 8t+i (low nibble) and 8t+4+i
    (high nibble) of column j, so one 32-byte load serves 8 columns (qkernels.py)."""
    out, inp = q.shape
    q = q.to(torch.uint8)
    if out % KERNEL_COLS:
        q = torch.cat([q, torch.zeros(-out % KERNEL_COLS, inp, dtype=torch.uint8)])
    b = q.reshape(-1, KERNEL_COLS, inp // 8, 2, 4)  # (column group, j, t, nibble, i)
    packed = b[:, :, :, 0] | (b[:, :, :, 1] << 4)
    return packed.permute(0, 2, 1, 3).reshape(-1, inp // 8, 32).contiguous()


def int4_kernel_layout_from_gguf(packed: torch.Tensor) -> torch.Tensor:
    """int4_kernel_layout of pack_int4's (GGUF's) nibbles, by byte operations on them, without the
    [out, in] values (an int32 copy of them cost 0.5 s and 100 MiB of resident memory at load).
    A GGUF block's bytes 0-3, 4-7, 8-11, 12-15 hold inputs 0-3, 4-7, 8-11, 12-15 in their low
    nibbles and those 16 further on in their high ones; the kernel pairs inputs 8t+i and 8t+4+i
    (t = 0..3 in a block of 32)."""
    out, half = packed.shape
    p = packed.reshape(out, half // 16, 4, 4)  # (column, block, quarter, i)
    a, b, c, d = p[:, :, 0], p[:, :, 1], p[:, :, 2], p[:, :, 3]
    lo, hi = 0x0F, 0xF0
    parts = [(a & lo) | ((b & lo) << 4), (c & lo) | ((d & lo) << 4), (a >> 4) | (b & hi), (c >> 4) | (d & hi)]
    q = torch.stack(parts, dim=2).reshape(out, half // 4, 4)  # (column, t, i)
    if out % KERNEL_COLS:
        q = torch.cat([q, torch.zeros(-out % KERNEL_COLS, half // 4, 4, dtype=torch.uint8)])
    return q.reshape(-1, KERNEL_COLS, half // 4, 4).permute(0, 2, 1, 3).reshape(-1, half // 4, 32).contiguous()


def int4_from_kernel_layout(packed: torch.Tensor, out: int) -> torch.Tensor:
    """int4_kernel_layout's inverse: [out, in] int32 values 0..15."""
    groups, t, _ = packed.shape
    b = packed.reshape(groups, t, KERNEL_COLS, 4).permute(0, 2, 1, 3).to(torch.int32)
    return torch.stack([b & 0x0F, b >> 4], dim=3).reshape(groups * KERNEL_COLS, t * 8)[:out]


def int8_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values -128..127 -> the int8 kernel's [ceil(out/8), ceil(in/32) * 8, 32] int8:
    per group of 8 output columns and 4 inputs 4t..4t+3, byte 4j+i holds input 4t+i of
    column j (zeros past in and out)."""
    out, inp = q.shape
    width = -(-inp // INT4_BLOCK) * INT4_BLOCK
    full = q.to(torch.int8)
    if out % KERNEL_COLS or width != inp:
        full = torch.zeros(-(-out // KERNEL_COLS) * KERNEL_COLS, width, dtype=torch.int8)
        full[:out, :inp] = q
    return full.reshape(-1, KERNEL_COLS, width // 4, 4).permute(0, 2, 1, 3).reshape(-1, width // 4, 32).contiguous()


def int8_from_kernel_layout(packed: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """int8_kernel_layout's inverse: [out, in] int8."""
    groups, t, _ = packed.shape
    return packed.reshape(groups, t, KERNEL_COLS, 4).permute(0, 2, 1, 3).reshape(groups * KERNEL_COLS, t * 4)[:out, :inp]


def int8_activations(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values the kernel's activations stand for, in `dtype` (float64: exactly): each row
    rounded per block of 32 inputs to q * d + q2 * d2, as qkernels.py's quantize_row does in
    float32: d = amax / 127, q = round-half-even(x * 127 / amax), then r = x - q * d on the grid
    d2 = d / 256: q2 = round-half-even(r * 256 / d) clamped to +-127."""
    rows, k = x.shape
    blocks = F.pad(x.float(), (0, -k % INT4_BLOCK)).reshape(rows, -1, INT4_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    # float32 divisions as the kernel's (torch's `127 / t` multiplies by a reciprocal instead)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q, d = torch.round(blocks * inv), amax / 127
    inv2 = torch.where(d > 0, torch.full_like(d, 256.0) / d, torch.zeros_like(d))
    q2, d2 = torch.round((blocks - q * d) * inv2).clamp(-127, 127), d * (1 / 256)
    out = q.to(dtype) * d.to(dtype) + q2.to(dtype) * d2.to(dtype)
    return out.reshape(rows, -1)[:, :k]


# --- modules ---


def int4_group_size(in_features: int, requested: int) -> int:
    """The requested group size, or the largest smaller one of INT4_GROUP_SIZES that divides
    in_features (e.g. 128 -> 64 for SmolLM2's 576): a model-wide setting should not fail on
    one odd layer width."""
    fits = [g for g in INT4_GROUP_SIZES if g <= requested and in_features % g == 0]
    if not fits:
        raise ValueError(
            f"int4 group size {requested}: none of {INT4_GROUP_SIZES} up to it divides in_features={in_features}"
        )
    return max(fits)


class WeightOnlyLinear(nn.Module):
    """What the int4 and int8 linears share: x cast to float32, the kernel, the result cast to
    out_dtype plus the bias; the torch fallback where the kernel could not be built."""

    def __init__(self, bias, out_dtype):
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))

    kernel_fits = True  # Int8Linear: not for every group size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = qkernels.kernel()
        xf = x.float()
        if module is not None and self.kernel_fits:
            y = self._kernel(module, xf)
        else:  # the kernel's activation rounding, then a float matmul
            y = F.linear(int8_activations(xf.reshape(-1, xf.shape[-1])).reshape(xf.shape), self.dequantized())
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias

    def _kernel(self, module, xf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _setup(self, shape, group_size, bias, out_dtype) -> None:
        raise NotImplementedError

    @classmethod
    def _bare(cls, shape, group_size, bias, out_dtype):
        """A linear with its shape and group size checked and set, its weight buffers still to store."""
        lin = cls.__new__(cls)
        lin._setup(shape, group_size, bias, out_dtype)
        return lin

    def dequantized(self) -> torch.Tensor:
        """The float32 [out, in] weight the kernel multiplies by (its own values and scales)."""
        raise NotImplementedError


class Int4Linear(WeightOnlyLinear):
    """y = x @ W.T with W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k // group_size
    (GPTQ/AWQ-style: zero is the value of q = 8). Stored as GGUF Q4_1's data, in the kernel's
    column groups (int4_kernel_layout, column_groups): the nibbles, and per group a float16 scale
    d and minimum m with W = q * d + m (m = zero - 8 * scale); GGUF Q4_0's blocks keep no m
    (m = -8d), so they stay at their 18 bytes per 32 weights."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bias, out_dtype):
        self._setup(q.shape, group_size, bias, out_dtype)
        self._store_grouped(int4_kernel_layout(q), scale, zero.double() - 8 * scale.double())

    def _setup(self, shape, group_size, bias, out_dtype) -> None:
        WeightOnlyLinear.__init__(self, bias, out_dtype)
        out, inp = shape
        if group_size <= 0 or group_size % INT4_BLOCK or inp % group_size:
            raise ValueError(f"int4 needs a group size that is a multiple of {INT4_BLOCK} dividing in_features={inp}")
        self.in_features, self.out_features, self.group_size = inp, out, group_size

    def _store_grouped(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
        """_store with scale and minimum given [out, groups]; minimum None: symmetric (GGUF Q4_0)."""
        out, groups = self.out_features, self.in_features // self.group_size
        scale = column_groups(scale.reshape(out, groups).to(SCALE_DTYPE))
        minimum = None if minimum is None else column_groups(minimum.reshape(out, groups).to(SCALE_DTYPE))
        self._store(packed, scale, minimum)

    def _store(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> None:
        """The kernel's layouts: int4_kernel_layout's nibbles, column_groups' scales and minimums."""
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        # Symmetric: min = -8 * scale, kept as an empty tensor (no bytes).
        self.register_buffer("minimum", torch.empty(0, dtype=SCALE_DTYPE) if minimum is None or minimum.numel() == 0
                             else minimum.to(SCALE_DTYPE).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias, group_size: int, out_dtype) -> "Int4Linear":
        # Asymmetric min/max per group, q = round((w - min) / s), with s and min rounded to
        # their stored dtype first so q is chosen against the values the kernel runs with.
        out, inp = w.shape
        group_size = int4_group_size(inp, group_size)
        g = w.float().reshape(out, inp // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-6).to(SCALE_DTYPE).float()
        lo = lo.to(SCALE_DTYPE).float()
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        lin = cls._bare(q.shape, group_size, bias, out_dtype)
        lin._store_grouped(int4_kernel_layout(q), scale, lo)
        return lin

    @classmethod
    def from_gguf(cls, w: QuantizedWeight, bias, out_dtype) -> "Int4Linear":
        lin = cls._bare(w.shape, INT4_BLOCK, bias, out_dtype)
        layout = _file_layout(w)
        if layout is not None:
            lin._store(*layout)
        else:
            packed, d, m = w.int4_blocks()  # the file's nibbles, scales and minimums as they are
            lin._store_grouped(int4_kernel_layout_from_gguf(packed), d, m)
        return lin

    def _kernel(self, module, xf: torch.Tensor) -> torch.Tensor:
        return module.int4_linear(xf, self.packed, self.scale, self.minimum, self.group_size, self.out_features)

    def dequantized(self) -> torch.Tensor:
        g = self.group_size
        q = int4_from_kernel_layout(self.packed, self.out_features).float().reshape(self.out_features, -1, g)
        scale = from_column_groups(self.scale, self.out_features).float()
        minimum = -8 * scale if self.minimum.numel() == 0 else from_column_groups(self.minimum, self.out_features).float()
        w = q * scale[..., None] + minimum[..., None]
        return w.reshape(self.out_features, self.in_features)


class Int8Linear(WeightOnlyLinear):
    """y = x @ W.T with symmetric int8 weights, W[n, k] = q[n, k] * scale[g, n], g = k // group_size.

    A group size below in_features keeps GGUF Q8_0's per-32 scales, which are worth keeping
    (requantizing the tied LM head of SmolLM2 per row moves its logits by up to 0.5, enough to
    flip greedy tokens). Float checkpoints quantized on load use one scale per row."""

    # True where the values and scales are a GGUF tensor's own (from_gguf), so dequantized_rows
    # gives that tensor's rows exactly: a tied embedding table can be looked up here.
    file_values = False

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group_size: int, bias, out_dtype):
        self._setup(q.shape, group_size, bias, out_dtype)
        groups = self.in_features // group_size
        self.register_buffer("qweight", int8_kernel_layout(q.to(torch.int8)))
        # given [groups, out] (one row of scales per input group), kept in column_groups' layout
        self.register_buffer("scales", column_groups(scale.reshape(groups, self.out_features).t().to(SCALE_DTYPE)))

    def _setup(self, shape, group_size, bias, out_dtype) -> None:
        WeightOnlyLinear.__init__(self, bias, out_dtype)
        out, inp = shape
        if group_size <= 0 or inp % group_size:
            raise ValueError(f"int8 group size {group_size} does not divide in_features={inp}")
        self.out_features, self.in_features, self.group_size = out, inp, group_size

    @property
    def kernel_fits(self) -> bool:
        """The kernel's activation blocks of 32 must each fall in one scale group."""
        return self.group_size % INT4_BLOCK == 0 or self.group_size == self.in_features

    @classmethod
    def from_float(cls, w: torch.Tensor, bias, out_dtype) -> "Int8Linear":
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-6)
        # Round the scale to its stored dtype first so q is chosen against the scale it runs with.
        scale = scale.to(SCALE_DTYPE).float()
        q = (w / scale[:, None]).round().clamp(-127, 127)
        return cls(q, scale[None, :], w.shape[1], bias, out_dtype)

    @classmethod
    def from_gguf(cls, w: QuantizedWeight, bias, out_dtype) -> "Int8Linear":
        layout = _file_layout(w)
        if layout is not None:
            lin = cls._bare(w.shape, INT4_BLOCK, bias, out_dtype)
            lin.register_buffer("qweight", layout[0])
            lin.register_buffer("scales", layout[1])
        else:
            q, d = w.int8_values()
            lin = cls(q, d.t(), INT4_BLOCK, bias, out_dtype)
        lin.file_values = True
        return lin

    def _kernel(self, module, xf: torch.Tensor) -> torch.Tensor:
        return module.int8_linear(xf, self.qweight, self.scales, self.group_size, self.out_features)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of dequantized(), read out of the kernel layout: a tied embedding table's
        lookup, with no float or file copy of the table beside this one. One C++ call where the
        module is built (the same bits); torch's ops else."""
        module = qkernels.kernel()
        if module is not None and self.kernel_fits:
            return module.int8_rows(ids.long().contiguous(), self.qweight, self.scales, self.group_size,
                                    self.out_features, self.in_features)
        groups, quads, _ = self.qweight.shape
        col, lane = ids // KERNEL_COLS, ids % KERNEL_COLS
        q = self.qweight.view(groups, quads, KERNEL_COLS, 4)[col, :, lane]  # [n, quads, 4]
        q = q.reshape(len(ids), quads * 4)[:, : self.in_features].float().reshape(len(ids), -1, self.group_size)
        return (q * self.scales[col, :, lane].float()[..., None]).reshape(len(ids), self.in_features)

    def dequantized(self) -> torch.Tensor:
        q = int8_from_kernel_layout(self.qweight, self.out_features, self.in_features).float()
        q = q.reshape(self.out_features, -1, self.group_size)
        scales = from_column_groups(self.scales, self.out_features).float()
        return (q * scales[..., None]).reshape(self.out_features, self.in_features)


def _file_layout(w) -> list[torch.Tensor] | None:
    """A GGUF tensor's blocks in the kernel's layouts, repacked by the C++ module in one pass
    (gguf_blocks.QuantizedWeight.kernel_layout); None without the module or for other packed
    weights, which take the torch path."""
    module = qkernels.kernel()
    return None if module is None or not hasattr(w, "kernel_layout") else w.kernel_layout(module)


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
) -> nn.Module:
    """A module computing x @ weight.T + bias, [N, in] -> [N, out] in `dtype` (table above)."""
    kernel = quantized_kernel(weight, quantization)
    if isinstance(weight, Fp8Weight) and quantization in ("auto", "fp8"):
        if not any(n % 16 for n in weight.shape):
            return Fp8Linear.from_checkpoint(weight, bias, dtype)
        log.warning("fp8 weight %s: _scaled_mm needs sizes divisible by 16, it runs dequantized (float)",
                    list(weight.shape))
    if not isinstance(weight, torch.Tensor):  # GGUF blocks, a checkpoint's packed ints or e4m3
        if quantization == "auto" and kernel is not None:
            return kernel.from_gguf(weight, bias, dtype)
        weight = weight.dequantize()
    if kernel is Int8Linear:
        return Int8Linear.from_float(weight, bias, dtype)
    if kernel is Int4Linear:
        return Int4Linear.from_float(weight, bias, group_size, dtype)
    if quantization == "fp8":
        return Fp8Linear.from_float(weight, bias, dtype)
    if quantization not in ("none", "auto"):
        raise ValueError(f"unknown quantization {quantization!r}")
    return FloatLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
