"""What a step's attention needs to know, in the same form for every backend.

The batch is flattened to T tokens: decode tokens (one query each) first, then prefill chunks.
Every token's K/V is written into the pool at its slot before any attention runs, so a chunk
attends to all earlier KV of its own request, whoever computed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the flattened batch
    num_tokens: int
    context_len: int  # tokens of KV the chunk attends to, its own included
    block_table: torch.Tensor  # [blocks covering context_len]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat slot index into the pool of each token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]; None without decodes
    decode_context_lens: torch.Tensor | None  # [num_decodes] keys each decode query sees, its own included
    prefills: list[PrefillChunk]
