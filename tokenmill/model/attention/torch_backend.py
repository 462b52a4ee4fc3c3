"""Paged attention in plain torch: the reference every kernel is tested against, and the path
for what no kernel covers (prefill chunks on the CPU; a GPU without triton).

Pool layout per layer: [num_blocks, kv_heads, block_size, row width]; slot = block * block_size
+ offset. The pool may hold another dtype than the model's (kv_dtype.py): rows are rounded or
quantized on write, and gathered rows are turned back into the query's dtype before the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from tokenmill.model.attention.kv_dtype import from_pool, to_pool
from tokenmill.model.attention.metadata import AttentionMetadata, PrefillChunk


@dataclass
class TorchStep:
    """A step's metadata and what the torch code derives from it: computed at first use, then
    reused by every layer."""

    meta: AttentionMetadata
    block_size: int

    @cached_property
    def slot_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in the block) of each token's slot."""
        return split_slots(self.meta.slot_mapping, self.block_size)

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size], True where a key lies past the context."""
        meta = self.meta
        lens = meta.decode_context_lens
        keys = torch.arange(meta.decode_block_tables.shape[1] * self.block_size, device=lens.device)
        return (keys[None, :] >= lens[:, None])[:, None, None, :]


class TorchAttention:
    name = "torch"
    # CUDA graphs are verified with the Triton kernels only (model/cuda_graphs.py).
    graph_capturable = False

    def prepare(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> TorchStep:
        return TorchStep(meta, k_cache.shape[2])

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: TorchStep) -> None:
        _write_split(k_cache, v_cache, k, v, *step.slot_split)

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, head_dim]
        v_cache: torch.Tensor,
        step: TorchStep,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        if step.meta.num_decodes:
            self.decode(q, k_cache, v_cache, step, scale, out)
        prefill_attention(q, k_cache, v_cache, step.meta.prefills, scale, out)
        return out

    def decode(self, q, k_cache, v_cache, step: TorchStep, scale: float, out: torch.Tensor) -> None:
        """The decode rows of `out` (the first num_decodes)."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        nd = step.meta.num_decodes
        # Gathering blocks gives [B, nb, kv_heads, bs, D]; the query heads of each KV head
        # (GQA) multiply every block in place as one broadcast batched matmul, so the gathered
        # K/V are never transposed into a copy and each KV head is read once.
        k = from_pool(k_cache[step.meta.decode_block_tables], q.dtype)
        v = from_pool(v_cache[step.meta.decode_block_tables], q.dtype)
        nb = k.shape[1]
        qd = q[:nd].view(nd, 1, num_kv_heads, group, head_dim)
        scores = torch.matmul(qd, k.transpose(-1, -2))  # [B, nb, kv_heads, group, bs]
        scores = scores.permute(0, 2, 3, 1, 4).reshape(nd, num_kv_heads, group, nb * block_size)
        scores = scores.float() * scale
        scores.masked_fill_(step.decode_mask, float("-inf"))
        probs = scores.softmax(-1).to(v.dtype).view(nd, num_kv_heads, group, nb, block_size)
        o = torch.matmul(probs.permute(0, 3, 1, 2, 4), v).sum(1, dtype=torch.float32)  # [B, kv_heads, group, D]
        out[:nd] = o.reshape(nd, num_heads, head_dim).to(q.dtype)


def torch_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """The reference KV write, from plain slots."""
    _write_split(k_cache, v_cache, k, v, *split_slots(slots, k_cache.shape[2]))


def torch_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference attention, from plain metadata."""
    backend = TorchAttention()
    return backend.forward(q, k_cache, v_cache, backend.prepare(meta, k_cache), scale)


def split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return slots // block_size, slots % block_size


def _write_split(k_cache, v_cache, k, v, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
    k_cache[blocks, :, offsets] = to_pool(k, k_cache.dtype)
    v_cache[blocks, :, offsets] = to_pool(v, v_cache.dtype)


def prefill_attention(q, k_cache, v_cache, prefills: list[PrefillChunk], scale: float, out: torch.Tensor) -> None:
    """The chunks' rows of `out`, each chunk attending causally to its context through SDPA."""
    for chunk in prefills:
        s, n, ctx = chunk.start, chunk.num_tokens, chunk.context_len
        k = from_pool(k_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :ctx], q.dtype)  # [kv_heads, L, D]
        v = from_pool(v_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :ctx], q.dtype)
        qp = q[s : s + n].transpose(0, 1)
        if ctx == n:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Query i sits at position ctx - n + i and sees keys 0..that position.
            qpos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = o.transpose(0, 1)
