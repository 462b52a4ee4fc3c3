"""Dense little-endian bit packing of unsigned b-bit integers into int32 words, along the last
dim: element i of a row occupies bits [i*b, (i+1)*b) of the row's bit stream, words taken in
order. For b = 4 or 8 that is the familiar nibble/byte order; for b = 3 a value may straddle two
words, as GPTQ's 3-bit qweight and compressed-tensors' packing both do."""

from __future__ import annotations

import torch


def packed_len(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] unsigned ints in [0, 2**bits) -> [rows, ceil(n*bits/32)] int32."""
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values outside [0, {1 << bits}) cannot be packed in {bits} bits")
    rows, n = v.shape
    words = packed_len(n, bits)
    pos = torch.arange(n) * bits
    word, shift = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)  # +1: the straddling tail's word
    out.index_add_(1, word, v << shift)  # bits never overlap, so add == or
    spill = shift + bits > 32
    if spill.any():
        out.index_add_(1, word[spill] + 1, v[:, spill] >> (32 - shift[spill]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of pack_int32: [rows, words] int32 -> [rows, n] int32 in [0, 2**bits)."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], dim=1)
    pos = torch.arange(n) * bits
    word, shift = pos // 32, pos % 32
    v = (p[:, word] >> shift) | (p[:, word + 1] << (32 - shift)) * (shift + bits > 32)
    return (v & ((1 << bits) - 1)).to(torch.int32)
