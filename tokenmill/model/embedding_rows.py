"""A quantized embedding table looked up where its values already are: a step dequantizes the
rows of its own tokens, never the whole table.

The default model's table is 49,152 x 576; held as float32 it cost 113 MiB of resident memory,
while a step reads a few hundred of its rows. Tied to the LM head (the default model), the rows
come out of the head's int8 kernel layout, so the table exists once in memory; otherwise out of
the GGUF blocks as the file maps them. Either way a row is dequantized with the same float32
operations as the whole table was, so the values are the same bits.

A host lookup: on an accelerator the table is dequantized once and moved there instead
(build.py), since a per-step copy from the host would stall the device and CUDA graphs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    def __init__(self, rows: Callable[[torch.Tensor], torch.Tensor], num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype, source: str):
        """`rows(ids)`: the float32 rows [len(ids), embedding_dim] of the table, for valid int64
        ids (Int8Linear.dequantized_rows, QuantizedWeight.dequantized_rows); `source` names it."""
        super().__init__()
        self.rows = rows
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype
        self.source = source

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # a host table (build.py gives accelerators a float one)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding table of {self.num_embeddings} rows")
        return self.rows(flat).to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows from {self.source}"
