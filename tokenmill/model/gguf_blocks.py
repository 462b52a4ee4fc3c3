"""GGUF tensors kept in their file encoding, and what the linears need from them: the float
matrix (gguf's reference dequantizer) or, for the types that map onto a CPU kernel, the integer
values and scales as they are.

The one place besides the file reader (gguf.py) that imports `gguf`: a QuantizedWeight only
exists where a GGUF file was read, so HF checkpoints and quantization of float weights
(quant.py) work without the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType
# The integer kernel (quant.py) that runs each of these types on the file's own values.
KERNEL_FORMATS: dict[GGMLQuantizationType, Literal["int4", "int8"]] = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q8_0: "int8"}


@dataclass
class QuantizedWeight:
    """A GGUF tensor kept in its file encoding: `data` is the raw bytes, one row of blocks per
    output row ([out, in_bytes] uint8), `shape` the logical [out, in] of the float matrix."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def kernel_format(self) -> Literal["int4", "int8"] | None:
        """The integer kernel that runs these blocks exactly as they are, if any."""
        return KERNEL_FORMATS.get(self.qtype)

    @staticmethod
    def stacked(weights: list) -> "QuantizedWeight | None":
        """Weights stacked along the output dim (exact: blocks run along the input dim), or None
        when they are not all QuantizedWeights of one type."""
        first = weights[0]
        if not all(isinstance(w, QuantizedWeight) and w.qtype == first.qtype for w in weights):
            return None
        rows = sum(w.shape[0] for w in weights)
        return QuantizedWeight(np.concatenate([w.data for w in weights]), first.qtype, (rows, first.shape[1]))

    def rows(self, index: np.ndarray | torch.Tensor) -> "QuantizedWeight":
        # Blocks run along the input dim, so picking or reordering output rows keeps the encoding
        # exact (used to undo llama.cpp's Q/K row permutation without dequantizing).
        index = np.asarray(index)
        return QuantizedWeight(np.ascontiguousarray(self.data[index]), self.qtype, (len(index), self.shape[1]))

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of dequantize() (an embedding table's lookup: only those rows are read)."""
        return self.rows(ids.numpy()).dequantize()

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix this weight encodes: the kernel formats in torch (the
        same float32 operations as gguf's reference dequantizer, so the same bits, but on
        every core: the default model's 28M-value embedding table took over a second in
        numpy), any other type with gguf's reference dequantizer."""
        if self.qtype == Q.Q8_0:
            q, d = self.int8_values()
            return (q.reshape(d.shape[0], d.shape[1], 32).float() * d.float()[..., None]).reshape(self.shape)
        if self.qtype in (Q.Q4_0, Q.Q4_1):
            nibbles, d, m = self.int4_blocks()
            blocks = nibbles.reshape(d.shape[0], d.shape[1], 16)
            # Byte j of a block holds input j (low nibble) and input j + 16 (high nibble).
            q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)
            d = d.float()[..., None]
            w = (q.to(torch.int8) - 8).float() * d if m is None else d * q.float() + m.float()[..., None]
            return w.reshape(self.shape)
        out = gguf_dequantize(self.data, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(self.shape))

    def int4_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0/Q4_1 -> (q [out, in] int32 in 0..15, d [out, in/32], m [out, in/32]) with w = d*q + m
        (Q4_0: w = d*(q-8), i.e. m = -8d). The nibble order is whatever gguf's dequantizer uses:
        we dequantize a copy whose scale is 1 and minimum 0, which yields q itself."""
        blocks = self._blocks()
        out, inp = self.shape
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        if self.qtype == Q.Q4_1:
            m = blocks[:, 2:4].view(np.float16).astype(np.float32)
            unit = blocks.copy()
            unit[:, 0:4] = np.array([1.0, 0.0], dtype=np.float16).view(np.uint8)
            q = gguf_dequantize(unit, Q.Q4_1)
        elif self.qtype == Q.Q4_0:
            m = -8.0 * d
            unit = blocks.copy()
            unit[:, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
            q = gguf_dequantize(unit, Q.Q4_0) + 8.0  # Q4_0 dequantizes to (q - 8) * d
        else:
            raise ValueError(f"not a 4-bit type: {self.qtype.name}")
        groups = inp // 32
        return (
            torch.from_numpy(np.rint(q).astype(np.int32).reshape(out, inp)),
            torch.from_numpy(d.reshape(out, groups)),
            torch.from_numpy(m.reshape(out, groups)),
        )

    def int4_blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Q4_0/Q4_1 as the int4 kernel keeps them, read from the blocks without decoding:
        (nibbles [out, in/2] uint8, each 32-block's 16 bytes as in the file, d [out, in/32],
        m [out, in/32], both float16 as in the file) with w = d*q + m. A Q4_1 block is fp16 d, fp16 m, 16 bytes; a Q4_0 block
        fp16 d, 16 bytes, and w = d*(q-8): m is None (the kernel's symmetric form, m = -8d)."""
        if self.qtype not in (Q.Q4_0, Q.Q4_1):
            raise ValueError(f"not a 4-bit type: {self.qtype.name}")
        blocks = self._blocks()
        out, inp = self.shape
        # Scales stay float16, the file's (and the kernel's) dtype: no conversion round trip.
        d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16)
        if self.qtype == Q.Q4_1:
            m, nibbles = np.ascontiguousarray(blocks[:, 2:4]).view(np.float16), blocks[:, 4:20]
        else:
            m, nibbles = None, blocks[:, 2:18]
        groups = inp // 32
        return (
            torch.from_numpy(np.ascontiguousarray(nibbles).reshape(out, inp // 2)),
            torch.from_numpy(d.reshape(out, groups)),
            None if m is None else torch.from_numpy(m.reshape(out, groups)),
        )

    def kernel_layout(self, module) -> list[torch.Tensor]:
        """The blocks in the int4 or int8 kernel's layouts (quant.py), repacked by `module`
        (qkernels' C++) from the file's bytes in one pass: int4 [q, scale, min] (min empty for
        Q4_0), int8 [q, scale]; what int4_blocks / int8_values then quant.py's layouts give."""
        out, inp = self.shape
        if self.qtype == Q.Q8_0:
            return module.int8_from_gguf(self.data, out, inp)
        if self.qtype in (Q.Q4_0, Q.Q4_1):
            return module.int4_from_gguf(self.data, out, inp, self.qtype == Q.Q4_1)
        raise ValueError(f"no kernel layout for {self.qtype.name}")

    def int8_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q8_0 -> (q [out, in] int8, d [out, in/32] float16) with w = d * q: each block is an
        fp16 scale d, then 32 int8 values."""
        if self.qtype != Q.Q8_0:
            raise ValueError(f"not Q8_0: {self.qtype.name}")
        blocks = self._blocks()
        out, inp = self.shape
        d = torch.from_numpy(np.ascontiguousarray(blocks[:, 0:2]).view(np.float16).reshape(out, inp // 32))
        q = torch.from_numpy(blocks[:, 2:].view(np.int8).reshape(out, inp).copy())
        return q, d

    def _blocks(self) -> np.ndarray:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.data.reshape(-1, type_size)
