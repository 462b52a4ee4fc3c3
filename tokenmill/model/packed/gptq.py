"""GPTQ checkpoints (`quant_method: gptq`), per linear `<name>.qweight` [in*b/32, out] int32
packed along the input dim, `.qzeros` [groups, out*b/32] int32 packed along the output dim,
`.scales` [groups, out] float16 and `.g_idx` [in] int32; W[k, n] = (q - z[g_idx[k], n]) * s.

Zero points: `checkpoint_format: gptq` (v1, the default and what most files are) stores z - 1,
an off-by-one the original kernels baked in; `gptq_v2` stores z itself. A v1 file cannot hold
z = 0 (it would wrap to the largest value), so a v1 writer needs z >= 1 (QuantGrid.min_zero)."""

from __future__ import annotations

import torch

from tokenmill.model.packed.bits import pack_int32, unpack_int32
from tokenmill.model.packed.weight import GroupQuantWeight

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def is_v1(qcfg: dict) -> bool:
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} (supported: gptq, gptq_v2)")
    return fmt == "gptq"


def marker(qcfg: dict) -> str:
    return "qweight"

def read(tensors: dict[str, torch.Tensor], prefix: str, qcfg: dict) -> GroupQuantWeight:
    bits = int(qcfg["bits"])
    qweight, qzeros, scales = tensors[prefix + "qweight"], tensors[prefix + "qzeros"], tensors[prefix + "scales"]
    groups, out = scales.shape
    inp = qweight.shape[0] * 32 // bits
    q = unpack_int32(qweight.t().contiguous(), bits, inp)  # [out, in]
    zero = unpack_int32(qzeros, bits, out).t()  # [out, groups]
    if is_v1(qcfg):
        zero = (zero + 1) & ((1 << bits) - 1)
    g_idx = tensors.get(prefix + "g_idx")
    if g_idx is None:
        group = int(qcfg.get("group_size", -1))
        g_idx = torch.arange(inp) // (inp if group <= 0 else group)
    return GroupQuantWeight(q, scales.float().t().contiguous(), zero.contiguous(), g_idx.to(torch.int64), bits)


def write(w: GroupQuantWeight, prefix: str, v1: bool = True) -> dict[str, torch.Tensor]:
    zero = w.zero
    if v1:
        if (zero == 0).any():
            raise ValueError("a GPTQ v1 file cannot hold a zero point of 0 (write gptq_v2, or quantize with min_zero=1)")
        zero = zero - 1
    return {
        prefix + "qweight": pack_int32(w.q, w.bits).t().contiguous(),
        prefix + "qzeros": pack_int32(zero.t().contiguous(), w.bits),
        prefix + "scales": w.scale.t().to(torch.float16).contiguous(),
        prefix + "g_idx": w.g_idx.to(torch.int32),
    }


def config(bits: int, group_size: int, sym: bool, desc_act: bool, v1: bool = True, damp: float = 0.01) -> dict:
    return {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
        "damp_percent": damp, "static_groups": False, "true_sequential": False,
        "checkpoint_format": "gptq" if v1 else "gptq_v2", "lm_head": False,
    }
