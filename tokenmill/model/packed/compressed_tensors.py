"""compressed-tensors checkpoints (llm-compressor's output), one weights scheme per file:

- `pack-quantized` (W4A16 / W8A16 int): per linear `.weight_packed` [out, in*b/32] int32 (values
  offset by 2**(b-1) to unsigned, packed densely along the input dim), `.weight_scale`
  [out, groups], `.weight_shape` [2], and for asymmetric schemes `.weight_zero_point`
  [out*b/32, groups] packed the same way along the output dim; optional `.weight_g_idx` (group
  act-order). Signed q and zero: W = (q - zp) * scale, which is (q_u - z_u) * scale in the
  offset (unsigned) values used here.
- `int-quantized` (W8A8 int8) and `naive-quantized` int: `.weight` int8 [out, in] as it is,
  `.weight_scale` per tensor [1], channel [out, 1] or group [out, groups], optional
  `.weight_zero_point` of the same shape. Runs the int8 kernel (which rounds the activations
  itself, finer than the scheme's per-token int8).
- `float-quantized` (FP8 W8A8) and `naive-quantized` float: `.weight` float8_e4m3fn [out, in],
  `.weight_scale` per tensor or channel -> Fp8Weight (model/fp8.py); per group or block (as
  DeepSeek-style FP8 files) -> dequantized to float, with a warning.

Static activation scales (`.input_scale`) are read past: tokenmill scales activations per token."""

from __future__ import annotations

import logging

import torch

from tokenmill.model.fp8 import FP8, Fp8Weight
from tokenmill.model.packed.bits import pack_int32, unpack_int32
from tokenmill.model.packed.weight import GroupQuantWeight

log = logging.getLogger(__name__)
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
            "input_scale", "input_zero_point")
PACKED, INT, FLOAT, NAIVE = "pack-quantized", "int-quantized", "float-quantized", "naive-quantized"
FORMATS = (PACKED, INT, FLOAT, NAIVE)


def weights_scheme(qcfg: dict) -> tuple[str, dict]:
    """(format, the one weights scheme of the config): one group of targets is what tokenmill reads."""
    groups = list((qcfg.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors with {len(groups)} config groups (supported: 1)")
    scheme = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or qcfg.get("format")
    kind = scheme.get("type", "int")
    if fmt not in FORMATS or (fmt, kind) in ((PACKED, "float"), (INT, "float"), (FLOAT, "int")):
        raise ValueError(f"compressed-tensors format {fmt!r} with {kind!r} weights (supported: "
                         f"{PACKED} int, {INT} int, {FLOAT} float, {NAIVE})")
    strategies = ("group", "channel") if fmt == PACKED else ("tensor", "channel", "group", "block")
    if scheme.get("strategy") not in strategies:
        raise ValueError(f"compressed-tensors {fmt} strategy {scheme.get('strategy')!r} (supported: {', '.join(strategies)})")
    if fmt != PACKED and int(scheme.get("num_bits", 8)) != 8:
        raise ValueError(f"compressed-tensors {fmt} with {scheme.get('num_bits')}-bit weights (supported: 8)")
    return fmt, scheme


def marker(qcfg: dict) -> str:
    """The tensor suffix every quantized linear of this checkpoint has (unquantized ones, such as
    an ignored lm_head, have a plain float `.weight` and no scale)."""
    return "weight_packed" if weights_scheme(qcfg)[0] == PACKED else "weight_scale"


def read(tensors: dict[str, torch.Tensor], prefix: str, qcfg: dict) -> "GroupQuantWeight | Fp8Weight | torch.Tensor":
    fmt, scheme = weights_scheme(qcfg)
    if fmt == PACKED:
        return _read_packed(tensors, prefix, scheme)
    weight, scale = tensors[prefix + "weight"], tensors[prefix + "weight_scale"].float()
    zp = tensors.get(prefix + "weight_zero_point")
    if scheme.get("strategy") == "block":
        b0, b1 = (int(b) for b in scheme["block_structure"])
        return _dequantized(prefix, weight, scale, zp, b0, b1, f"{b0}x{b1} block scales")
    out, inp = weight.shape
    scale = scale.reshape(1, 1).expand(out, 1) if scale.numel() == 1 else scale.reshape(out, -1)
    if weight.dtype == FP8:
        if scale.shape[1] == 1 and zp is None:
            return Fp8Weight(weight, scale[:, 0].contiguous())
        why = f"fp8 with {scale.shape[1]} scales per row" + ("" if zp is None else " and zero points")
        zp = None if zp is None else zp.reshape(scale.shape)
        return _dequantized(prefix, weight, scale, zp, 1, inp // scale.shape[1], why)
    if weight.dtype != torch.int8:
        raise ValueError(f"weight dtype {weight.dtype} (want int8 or float8_e4m3fn)")
    zero = torch.full(scale.shape, 128, dtype=torch.int32) if zp is None else zp.reshape(scale.shape).to(torch.int32) + 128
    groups = scale.shape[1]
    return GroupQuantWeight(weight.to(torch.int32) + 128, scale.contiguous(), zero, torch.arange(inp) // (inp // groups), 8)


def _read_packed(tensors: dict[str, torch.Tensor], prefix: str, scheme: dict) -> GroupQuantWeight:
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


def _dequantized(prefix: str, weight: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, b0: int, b1: int,
                 why: str) -> torch.Tensor:
    """(weight - zp) * scale with one scale (and zero point) per b0 x b1 tile ([out/b0, in/b1];
    edge tiles partial; a group of G is a 1 x G tile) -> float weights, with a warning."""
    out, inp = weight.shape
    rows = torch.arange(out) // b0
    cols = torch.arange(inp) // b1
    w = weight.float()
    if zp is not None:
        w = w - zp.float()[rows][:, cols]
    log.warning("%sweight: %s: no kernel takes them, it runs dequantized (float)", prefix, why)
    return w * scale[rows][:, cols]


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
