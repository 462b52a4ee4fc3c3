"""Paged attention: the torch backend (the CPU path and the reference) and the dispatch.

`write_kv` and `paged_attention` run the Triton kernels (triton_attention.py) on CUDA
tensors when triton imports; on the CPU, decode queries run the C++ kernel of cpu_attention.py
when it could be built; the torch code below runs everything else and is the reference. The
batch is flattened to T tokens, decode tokens (one query each) first, then prefill chunks. Every token's K/V is
written into the pool at its slot before any attention runs, so a chunk attends to all
earlier KV of its own request, whoever computed it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size], True = masked
    prefills: list[PrefillChunk]
    # [num_decodes] keys each decode query sees. Optional: a backend that needs it derives it
    # from decode_mask when absent (one small kernel per step instead of none).
    decode_context_lens: torch.Tensor | None = None
    # Rows from here on are prompt tokens (the runner orders them last): quantized linears run
    # them through their dense copies (quant.py). None: every row runs the quantized kernels.
    dense_from: int | None = None
    # Per-step values a backend derives from the above once and every layer reuses.
    backend_cache: dict = field(default_factory=dict, repr=False, compare=False)


@functools.cache
def triton_backend():
    try:
        from tokenmill.model import triton_attention
    except ImportError:  # no triton: the torch code runs on the GPU too, only slower
        return None
    return triton_attention


def _gpu_backend(t: torch.Tensor):
    # Imported only for CUDA tensors, so CPU runs never pay for importing triton.
    return triton_backend() if t.is_cuda else None


def _cpu_decode_kernel(q: torch.Tensor, meta: AttentionMetadata):
    """The C++ decode kernel (cpu_attention.py) when it is built and fits this step, else None."""
    lens, tables = meta.decode_context_lens, meta.decode_block_tables
    if (
        q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16)
        or lens is None or lens.dtype != torch.long or tables.dtype != torch.long
    ):
        return None
    from tokenmill.model.cpu_attention import kernel

    return kernel()


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
    backend = _gpu_backend(k_cache)
    if backend is not None:
        return backend.write_kv(k_cache, v_cache, k, v, meta.slot_mapping.to(k_cache.device, non_blocking=True))
    cache = meta.backend_cache
    if "slot_split" not in cache:  # once per step, not per layer
        cache["slot_split"] = _split_slots(meta.slot_mapping, k_cache.shape[2])
    _write_split(k_cache, v_cache, k, v, *cache["slot_split"])


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    backend = _gpu_backend(q)
    if backend is not None:
        return backend.paged_attention(q, k_cache, v_cache, meta, scale)
    decode = _cpu_decode_kernel(q, meta) if meta.num_decodes else None
    if decode is None:
        return torch_paged_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    nd = meta.num_decodes
    decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out[:nd])
    _torch_prefills(q, k_cache, v_cache, meta.prefills, scale, out)
    return out


def torch_write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    # Pool layout [num_blocks, kv_heads, block_size, head_dim]: slot = block * block_size + offset.
    _write_split(k_cache, v_cache, k, v, *_split_slots(slots, k_cache.shape[2]))


def _split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return slots // block_size, slots % block_size


def _write_split(k_cache, v_cache, k, v, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def torch_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        # Gathering blocks gives [B, nb, kv_heads, bs, D]; the query heads of each KV head
        # (GQA) multiply every block in place as one broadcast batched matmul, so the gathered
        # K/V are never transposed into a copy and each KV head is read once.
        k = k_cache[meta.decode_block_tables]
        v = v_cache[meta.decode_block_tables]
        nb = k.shape[1]
        qd = q[:nd].view(nd, 1, num_kv_heads, group, head_dim)
        scores = torch.matmul(qd, k.transpose(-1, -2))  # [B, nb, kv_heads, group, bs]
        scores = scores.permute(0, 2, 3, 1, 4).reshape(nd, num_kv_heads, group, nb * block_size)
        scores = scores.float() * scale
        scores.masked_fill_(meta.decode_mask, float("-inf"))
        probs = scores.softmax(-1).to(v.dtype).view(nd, num_kv_heads, group, nb, block_size)
        o = torch.matmul(probs.permute(0, 3, 1, 2, 4), v).sum(1, dtype=torch.float32)  # [B, kv_heads, group, D]
        out[:nd] = o.reshape(nd, num_heads, head_dim).to(q.dtype)
    _torch_prefills(q, k_cache, v_cache, meta.prefills, scale, out)
    return out


def _torch_prefills(q, k_cache, v_cache, prefills: list[PrefillChunk], scale: float, out: torch.Tensor) -> None:
    for chunk in prefills:
        s, n, ctx = chunk.start, chunk.num_tokens, chunk.context_len
        k = k_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :ctx]  # [kv_heads, L, D]
        v = v_cache[chunk.block_table].transpose(0, 1).flatten(1, 2)[:, :ctx]
        qp = q[s : s + n].transpose(0, 1)
        if ctx == n:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Query i sits at position ctx - n + i and sees keys 0..that position.
            qpos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = o.transpose(0, 1)
