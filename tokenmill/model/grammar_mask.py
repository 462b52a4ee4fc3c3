"""Apply allowed-token bitmasks to logits (torch, wherever the logits are). The sampler's half of
structured output: the engine core fills the bitmask (tokenmill.structured.compiler)."""

from __future__ import annotations

import torch

from tokenmill.model.host import to_device


def apply_bitmask_(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """logits[rows[k]] keeps only the tokens whose bit is set in bitmask[k]; other rows untouched.
    (llguidance.torch has a torch.compile'd version; compiling is not worth it on CPU.)"""
    vocab, dev = logits.shape[1], logits.device
    # The bitmask is filled on the host (llguidance); on a GPU it crosses once, as int32 words,
    # through pinned memory so the host does not wait for the copy.
    bits = torch.arange(32, dtype=torch.int32, device=dev)  # built where it is used: no copy
    allowed = ((to_device(bitmask, dev).unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]
    idx = to_device(rows, dev)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
