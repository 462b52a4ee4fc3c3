"""Quantized HF checkpoints (GPTQ, AWQ, compressed-tensors `pack-quantized`): their int32 bit
packing, their zero-point conventions, and the one in-memory form they all read into
(`GroupQuantWeight`), which the linears run on tokenmill's int4/int8 kernels.

Reading lives in the model layer because loading needs it; `tokenmill quantize` (the layer
above) writes through the same modules, so a round trip cannot drift between two copies."""

from tokenmill.model.packed.formats import FORMATS, QuantFormat, format_for, read_quantized
from tokenmill.model.packed.weight import GroupQuantWeight

__all__ = ["FORMATS", "GroupQuantWeight", "QuantFormat", "format_for", "read_quantized"]
