"""Which quantized format a config.json names, and reading a checkpoint's tensors into
GroupQuantWeights under the plain `<linear>.weight` names the decoder asks for."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from tokenmill.model.packed import awq, compressed_tensors, gptq
from tokenmill.model.packed.weight import GroupQuantWeight, warn_unsupported


@dataclass(frozen=True)
class QuantFormat:
    name: str  # the quant_method in config.json
    module: ModuleType
    marker: str  # the tensor suffix every quantized linear of the format has


FORMATS = {
    "gptq": QuantFormat("gptq", gptq, "qweight"),
    "awq": QuantFormat("awq", awq, "qweight"),
    "compressed-tensors": QuantFormat("compressed-tensors", compressed_tensors, "weight_packed"),
}


def format_for(qcfg: dict) -> QuantFormat:
    method = qcfg.get("quant_method")
    if method not in FORMATS:
        raise ValueError(f"quantization_config.quant_method {method!r} (supported: {', '.join(FORMATS)})")
    return FORMATS[method]


def read_quantized(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, "torch.Tensor | GroupQuantWeight"]:
    """Every quantized linear's tensors -> one GroupQuantWeight named `<linear>.weight`; other
    tensors pass through. Raises ValueError (with the tensor's name) on a malformed one."""
    fmt = format_for(qcfg)
    marker = "." + fmt.marker
    linears = [name[: -len(fmt.marker)] for name in tensors if name.endswith(marker)]
    out = dict(tensors)
    for prefix in linears:
        try:
            w = fmt.module.read(tensors, prefix, qcfg)
        except (KeyError, RuntimeError, IndexError) as e:
            raise ValueError(f"{prefix}{fmt.marker}: not a readable {fmt.name} tensor set ({type(e).__name__}: {e})") from e
        for suffix in fmt.module.SUFFIXES:
            out.pop(prefix + suffix, None)
        out[prefix + "weight"] = w
        warn_unsupported(prefix + "weight", w)
    return out
