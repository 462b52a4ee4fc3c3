"""AWQ GEMM checkpoints (`quant_method: awq`, `version: gemm`, 4 bits): per linear `.qweight`
[in, out/8] int32 and `.qzeros` [groups, out/8] int32, both packed along the output dim in
AWQ's interleaved order, and `.scales` [groups, out] float16; W[k, n] = (q - z) * s, zero
stored as is. The interleave: the 8 nibbles of a word, low to high, hold output columns
0, 2, 4, 6, 1, 3, 5, 7 of its 8 (the order its GEMM kernel dequantizes pairs in)."""

from __future__ import annotations

import torch

from tokenmill.model.packed.bits import pack_int32, unpack_int32
from tokenmill.model.packed.weight import GroupQuantWeight

SUFFIXES = ("qweight", "qzeros", "scales")
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # column held by nibble i
REVERSE = torch.argsort(ORDER)  # nibble holding column c: 0, 4, 1, 5, 2, 6, 3, 7


def pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit values -> [rows, cols/8] int32 in AWQ order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 output columns a word; {cols} columns")
    return pack_int32(values.reshape(rows, cols // 8, 8)[..., ORDER].reshape(rows, cols), 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    rows, words = packed.shape
    v = unpack_int32(packed, 4, words * 8).reshape(rows, words, 8)
    return v[..., REVERSE].reshape(rows, words * 8)


def marker(qcfg: dict) -> str:
    return "qweight"

def read(tensors: dict[str, torch.Tensor], prefix: str, qcfg: dict) -> GroupQuantWeight:
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    version = str(qcfg.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise ValueError(f"AWQ {bits}-bit {version!r} checkpoints (supported: 4-bit gemm)")
    q = unpack(tensors[prefix + "qweight"]).t().contiguous()  # [out, in]
    zero = unpack(tensors[prefix + "qzeros"]).t().contiguous()  # [out, groups]
    scale = tensors[prefix + "scales"].float().t().contiguous()
    inp, groups = q.shape[1], scale.shape[1]
    return GroupQuantWeight(q, scale, zero, torch.arange(inp) // (inp // groups), bits)


def write(w: GroupQuantWeight, prefix: str) -> dict[str, torch.Tensor]:
    if w.bits != 4 or w.group_size is None:
        raise ValueError("AWQ GEMM files hold 4-bit weights in contiguous groups only")
    return {
        prefix + "qweight": pack(w.q.t().contiguous()),
        prefix + "qzeros": pack(w.zero.t().contiguous()),
        prefix + "scales": w.scale.t().to(torch.float16).contiguous(),
    }


def config(bits: int, group_size: int) -> dict:
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"}
