"""compressed-tensors `pack-quantized` checkpoints (llm-compressor's W4A16 / W8A16 int schemes):
per linear `.weight_packed` [out, in*b/32] int32 (values offset by 2**(b-1) to unsigned, packed
densely along the input dim), `.weight_scale` [out, groups], `.weight_shape` [2], and for
asymmetric schemes `.weight_zero_point` [out*b/32, groups] packed the same way along the output
dim; optional `.weight_g_idx` (group act-order). Signed q and zero: W = (q - zp) * scale, which
is (q_u - z_u) * scale in the offset (unsigned) values used here."""

from __future__ import annotations

import torch

from tokenmill.model.packed.bits import pack_int32, unpack_int32
from tokenmill.model.packed.weight import GroupQuantWeight

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def weights_scheme(qcfg: dict) -> dict:
    """The one weights scheme of the config (one group of targets is what tokenmill reads)."""
    fmt = qcfg.get("format")
    groups = list((qcfg.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors with {len(groups)} config groups (supported: 1)")
    scheme = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or fmt
    if fmt != "pack-quantized" or scheme.get("type", "int") != "int":
        raise ValueError(f"compressed-tensors format {fmt!r} with {scheme.get('type')!r} weights (supported: pack-quantized int)")
    if scheme.get("strategy") not in ("group", "channel"):
        raise ValueError(f"compressed-tensors strategy {scheme.get('strategy')!r} (supported: group, channel)")
    return scheme


def read(tensors: dict[str, torch.Tensor], prefix: str, qcfg: dict) -> GroupQuantWeight:
    scheme = weights_scheme(qcfg)
    bits = int(scheme["num_bits"])
    out, inp = (int(x) for x in tensors[prefix + "weight_shape"].tolist())
    q = unpack_int32(tensors[prefix + "weight_packed"], bits, inp)
    scale = tensors[prefix + "weight_scale"].float()
    groups = scale.shape[1]
    zp = tensors.get(prefix + "weight_zero_point")
    if zp is None or scheme.get("symmetric", True):
        zero = torch.full((out, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zero = unpack_int32(zp.t().contiguous(), bits, out).t().contiguous()
    g_idx = tensors.get(prefix + "weight_g_idx")
    g_idx = torch.arange(inp) // (inp // groups) if g_idx is None else g_idx.to(torch.int64)
    return GroupQuantWeight(q, scale.contiguous(), zero, g_idx, bits)


def write(w: GroupQuantWeight, prefix: str, sym: bool) -> dict[str, torch.Tensor]:
    if w.bits not in (4, 8):
        raise ValueError(f"compressed-tensors pack-quantized here holds 4 or 8 bits, not {w.bits}")
    out = {
        prefix + "weight_packed": pack_int32(w.q, w.bits),
        prefix + "weight_scale": w.scale.to(torch.float16).contiguous(),
        prefix + "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }
    if not sym:
        out[prefix + "weight_zero_point"] = pack_int32(w.zero.t().contiguous(), w.bits).t().contiguous()
    if w.group_size is None:
        out[prefix + "weight_g_idx"] = w.g_idx.to(torch.int32)
    return out


def config(bits: int, group_size: int, sym: bool, ignore: list[str]) -> dict:
    weights = {
        "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size,
        "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None, "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore, "kv_cache_scheme": None,
    }
