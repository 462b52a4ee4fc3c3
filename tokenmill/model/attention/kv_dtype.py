"""The KV pool's element type (--kv-cache-dtype): the bytes a token takes, and how K and V rows
are rounded or quantized on their way into the pool and back out of it.

A 16-bit pool rounds each value on write (torch's round-to-nearest-even), so every reader sees
the same rounded keys whichever path wrote them. An int8 pool quantizes each (token, KV head)
row symmetrically: head_dim int8 values, then the row's float32 scale (amax / 127) in the
row's last 4 bytes. The scale lives inline, beside its values, rather than in a second tensor,
so whatever addresses a row (a slot, a block table, a gather) carries its scale along, and a
layer's pool stays one K and one V tensor for every backend. The price is 4 bytes per 64:
an int8 token takes 68/256 of a float32 one (3.76x the tokens in the same memory).
"""

from __future__ import annotations

import torch

TORCH_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
SCALE_BYTES = 4  # one float32 per int8 row
INT8_MAX = 127  # symmetric: -127..127, so the scale maps amax to exactly 127


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements per (token, KV head) row of the pool."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over every layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * row_width(head_dim, dtype) * itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in TORCH_KV_DTYPES.items() if d == dtype)


def quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] floats -> [..., D + 4] int8: the rounded values, then the row's scale's bytes."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / INT8_MAX
    # An all-zero row keeps scale 0 and values 0; the clamp only guards the division.
    q = (xf / scale.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(-INT8_MAX, INT8_MAX)
    return torch.cat([q.to(torch.int8), scale.view(torch.int8)], -1)


def to_pool(x: torch.Tensor, pool_dtype: torch.dtype) -> torch.Tensor:
    """Rows as the pool stores them: quantized for int8, else rounded to its float type."""
    return quantize_int8(x) if pool_dtype == torch.int8 else x.to(pool_dtype)


def from_pool(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows [..., width] back to [..., D] values in `dtype` (the query's): what the torch
    and triton paths compute with."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)
