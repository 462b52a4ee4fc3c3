"""Which quantized format a config.json names, and reading a checkpoint's tensors into
GroupQuantWeights under the plain `<linear>.weight` names the decoder asks for."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from tokenmill.model.fp8 import Fp8Weight
from tokenmill.model.packed import awq, compressed_tensors, gptq
from tokenmill.model.packed.weight import GroupQuantWeight, warn_unsupported


@dataclass(frozen=True)
class QuantFormat:
    name: str  # the quant_method in config.json
    module: ModuleType  # read(tensors, prefix, qcfg), marker(qcfg): the suffix every quantized linear has


FORMATS = {
    "gptq": QuantFormat("gptq", gptq),
    "awq": QuantFormat("awq", awq),
    "compressed-tensors": QuantFormat("compressed-tensors", compressed_tensors),
}


def format_for(qcfg: dict) -> QuantFormat:
    method = qcfg.get("quant_method")
    if method not in FORMATS:
        raise ValueError(f"quantization_config.quant_method {method!r} (supported: {', '.join(FORMATS)})")
    return FORMATS[method]


def read_quantized(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, "torch.Tensor | GroupQuantWeight | Fp8Weight"]:
    """Every quantized linear's tensors -> one weight named `<linear>.weight` (a GroupQuantWeight,
    or for FP8 an Fp8Weight or float tensor); other tensors pass through. Raises ValueError (with
    the tensor's name) on a malformed one."""
    fmt = format_for(qcfg)
    suffix = fmt.module.marker(qcfg)
    linears = [name[: -len(suffix)] for name in tensors if name.endswith("." + suffix)]
    out = dict(tensors)
    for prefix in linears:
        try:
            w = fmt.module.read(tensors, prefix, qcfg)
        except (KeyError, RuntimeError, IndexError, ValueError) as e:
            raise ValueError(f"{prefix}{suffix}: not a readable {fmt.name} tensor set ({type(e).__name__}: {e})") from e
        for consumed in fmt.module.SUFFIXES:
            out.pop(prefix + consumed, None)
        out[prefix + "weight"] = w
        if isinstance(w, GroupQuantWeight):
            warn_unsupported(prefix + "weight", w)
    return out
