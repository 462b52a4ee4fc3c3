"""Paged attention, Triton backend: the GPU path.

Same contract as the torch backend (torch_backend.py), the reference these kernels are tested
against. Pool layout per layer:
k_cache / v_cache [num_blocks, kv_heads, block_size, head_dim]; token t of a sequence lives
in block table[t // block_size] at offset t % block_size.

- `write_kv`: one program per (token, kv head) copies a head_dim row into its slot.
- `decode_attention`: flash-decoding. A program takes one sequence, one KV head and one
  split of the KV length, with all the query heads of that KV head's group as the rows of
  its tile, so each K/V block is read once per group; a second kernel merges the splits by
  their log-sum-exp. Splits keep the GPU busy when batch x kv_heads is small.
- `prefill_attention`: variable-length causal attention for prefill chunks (and anything
  with several queries, e.g. speculative verification) through the block tables. A tile's
  rows are (token, head-of-group) pairs, so again K/V is read once per group.

Nothing here reads a device value back (no .item(), no .cpu()): every grid size comes from
shapes or host-side ints, so a step's kernels queue without waiting for the GPU.
On CPU tensors (Triton's interpreter, TRITON_INTERPRET=1) the kernels run for tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.model.attention.kv_dtype import to_pool
from tokenmill.model.attention.metadata import AttentionMetadata, PrefillChunk

_LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _attend(
    acc, m_i, l_i,  # running output [M, D], row max [M] and row sum [M], base-2 logits
    q,  # [M, BLOCK_D] query rows, already in DOT_T
    qpos,  # [M] position of each row's query: it sees keys 0..qpos
    k_cache, v_cache, table,  # table: this sequence's block table
    kv_head, lo, hi,  # keys lo..hi-1 of the sequence
    stride_kb, stride_kh, stride_kt, block_size, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr,
):
    """Online softmax of the rows of q over keys lo..hi-1 of one sequence's paged K/V."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n
        t_ok = t < hi
        # A tile may span several pool blocks: look up each token's block (the table row is
        # tiny and stays in cache), so the tile size need not match the block size.
        block = tl.load(table + t // block_size, mask=t_ok, other=0).to(tl.int64)
        row = block * stride_kb + kv_head * stride_kh + (t % block_size) * stride_kt
        kv_ok = t_ok[:, None] & d_ok[None, :]
        # Masked loads never touch slots past the context, which may hold anything.
        k = tl.load(k_cache + row[:, None] + offs_d[None, :], mask=kv_ok, other=0.0).to(DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(t_ok[None, :] & (t[None, :] <= qpos[:, None]), s, float("-inf"))
        # Every row sees key lo in the first tile (callers guarantee it), so m_new is finite
        # from there on and no exp2(-inf - -inf) NaN can appear.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + row[:, None] + offs_d[None, :], mask=kv_ok, other=0.0).to(DOT_T)
        # Probabilities are rounded to the value dtype before P @ V, as the torch path does.
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _write_kv_kernel(
    k, v, k_cache, v_cache, slots,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots + token).to(tl.int64)
    # A negative slot is a padding token (e.g. a batch padded up to a captured graph's size).
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        ok = d < HEAD_DIM
        dst = (slot // block_size) * stride_cb + head * stride_ch + (slot % block_size) * stride_ct + d
        tl.store(k_cache + dst, tl.load(k + token * stride_kt + head * stride_kh + d, mask=ok), mask=ok)
        tl.store(v_cache + dst, tl.load(v + token * stride_vt + head * stride_vh + d, mask=ok), mask=ok)


@triton.jit
def _decode_kernel(
    q, k_cache, v_cache, tables, context_lens, out, part_out, part_lse,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kh, stride_kt, stride_table,
    block_size, split_tokens, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DIRECT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(context_lens + seq).to(tl.int32)
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, ctx)  # hi <= lo: an empty split (short sequence)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    # The tile has BLOCK_G >= 16 rows (tensor-core minimum); rows past the group are zeros.
    qt = tl.load(q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_ok, other=0.0)
    qpos = tl.zeros([BLOCK_G], dtype=tl.int32) + ctx - 1
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, qt.to(DOT_T), qpos, k_cache, v_cache, tables + seq * stride_table,
        kv_head, lo, hi, stride_kb, stride_kh, stride_kt, block_size, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, DOT_T,
    )
    # l == 0 only for an empty split or a zero-length (padding) sequence: output zeros.
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DIRECT:
        dst = out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out.dtype.element_ty), mask=row_ok)
    else:
        # Partials are [seq, head, split, BLOCK_D] float32 and lse [seq, head, split]; an empty
        # split writes lse = -inf, so the merge gives it weight 0 without knowing the lengths.
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_out + part[:, None] * BLOCK_D + d[None, :], o, mask=row_ok)
        tl.store(part_lse + part, m_i + tl.log2(l_i), mask=g < GROUP)


@triton.jit
def _decode_merge_kernel(
    part_out, part_lse, out, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part = (seq * tl.num_programs(1) + head) * num_splits + s
    lse = tl.load(part_lse + part, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0, output 0
    w = tl.exp2(lse - m)
    o = tl.load(part_out + part[:, None] * BLOCK_D + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out + seq * stride_ot + head * stride_oh + d, res.to(out.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q, k_cache, v_cache, chunks, tables, out,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kh, stride_kt,
    block_size, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr,
):
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    kv_head = tl.program_id(2)
    # chunks[c] = (first token in the batch, num_tokens, context_len, first entry in tables)
    q_start = tl.load(chunks + chunk * 4)
    n = tl.load(chunks + chunk * 4 + 1)
    ctx = tl.load(chunks + chunk * 4 + 2)
    table_start = tl.load(chunks + chunk * 4 + 3)
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile, each with GROUP heads
    first = tile * TOKENS
    # The grid is sized for the longest chunk; tiles past a shorter chunk's end do nothing.
    if first < n:
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        i = first + r // GROUP
        heads = kv_head * GROUP + r % GROUP
        row_ok = (r < TOKENS * GROUP) & (i < n)
        ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
        rows = (q_start + i)[:, None] * stride_qt + heads[:, None] * stride_qh
        qt = tl.load(q + rows + d[None, :], mask=ok, other=0.0)
        # The chunk's queries are the last n positions of its context (causal). Rows past the
        # chunk get positions past it too: they still see key 0, so they never go NaN.
        qpos = ctx - n + i
        hi = tl.minimum(ctx, ctx - n + first + TOKENS)  # keys past the tile's last query are never seen
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, qt.to(DOT_T), qpos, k_cache, v_cache, tables + table_start,
            kv_head, 0, hi, stride_kb, stride_kh, stride_kt, block_size, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, DOT_T,
        )
        o = acc / l_i[:, None]
        dst = out + (q_start + i)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# Launchers


@dataclass
class PackedPrefills:
    """The prefill chunks of a step as device tensors, built once and used by every layer."""

    chunks: torch.Tensor  # [num_chunks, 4] int32: batch start, num_tokens, context_len, table start
    tables: torch.Tensor  # all chunks' block tables, concatenated
    max_tokens: int  # the longest chunk (sizes the grid; a host int, so no sync)


def pack_prefills(prefills: list[PrefillChunk], device: torch.device) -> PackedPrefills:
    rows, start = [], 0
    for c in prefills:
        rows.append((c.start, c.num_tokens, c.context_len, start))
        start += len(c.block_table)
    # Non-blocking copies of fresh host tensors: staged at once, no wait on the device.
    chunks = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    tables = torch.cat([c.block_table for c in prefills]).to(device, non_blocking=True)
    return PackedPrefills(chunks, tables, max(c.num_tokens for c in prefills))


def _dot_dtype(t: torch.Tensor):
    # The interpreter (CPU tensors) keeps bf16/fp16 as raw 16-bit integers and its tl.dot would
    # multiply the bits, so there the dots run in float32; on the GPU they run in the KV dtype.
    if not t.is_cuda or t.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[t.dtype]


def _check_pool(k_cache: torch.Tensor, v_cache: torch.Tensor):
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "K and V pools share one layout"
    # A 16-bit pool under a float32 model is fine (stores round, loads widen); an int8 pool's
    # rows carry their scale, which these kernels do not read: backend.py gives it the torch path.
    assert k_cache.is_floating_point() and k_cache.dtype == v_cache.dtype, "Triton reads float KV pools only"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: splitting only costs time there
    return torch.cuda.get_device_properties(device).multi_processor_count


def write_kv(k_cache, v_cache, k, v, slots):
    """k, v [T, kv_heads, D] into the pool at slots [T] (negative slots are skipped)."""
    _check_pool(k_cache, v_cache)
    if k.dtype != k_cache.dtype:
        # A 16-bit pool under a float32 model: rounded by torch, as the other backends round
        # (kv_dtype.to_pool), so a pool's bits do not depend on which backend wrote it.
        k, v = to_pool(k, k_cache.dtype), to_pool(v, v_cache.dtype)
    assert k.dtype == k_cache.dtype and v.dtype == v_cache.dtype
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    t, kv_heads, head_dim = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t, kv_heads)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], k_cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )


def _split_tokens(batch: int, kv_heads: int, max_context: int, num_sms: int, block_n: int) -> int:
    # Enough programs for about 4 waves over the SMs, but splits no shorter than 256 keys:
    # below that the merge and the partials cost more than the parallelism brings.
    want = max(1, -(-4 * num_sms // (batch * kv_heads)))
    split = max(256, -(-max_context // want))
    return -(-split // block_n) * block_n


def decode_splits(q, block_tables, kv_heads: int, block_size: int, split_tokens: int | None = None, block_n: int = 64):
    """(keys per split, splits per sequence) for a decode batch."""
    # The longest possible context comes from the table's width, a shape: no host sync.
    max_context = block_tables.shape[1] * block_size
    if split_tokens is None:
        split_tokens = _split_tokens(q.shape[0], kv_heads, max_context, _num_sms(q.device), block_n)
    assert split_tokens % block_n == 0, "a split is whole tiles"
    return split_tokens, triton.cdiv(max_context, split_tokens)


def decode_attention(
    q,  # [B, heads, D], one query per sequence
    k_cache, v_cache,
    block_tables,  # [B, max_blocks] (padding entries are never read)
    context_lens,  # [B] keys each query sees, its own included (0: a padding row, output 0)
    scale: float,
    out=None,
    split_tokens: int | None = None,  # keys per split (a multiple of the tile); None: chosen
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
):
    _check_pool(k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    if batch == 0:
        return out
    split_tokens, num_splits = decode_splits(q, block_tables, kv_heads, block_size, split_tokens, block_n)
    block_d = triton.next_power_of_2(head_dim)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], block_tables.stride(0),
        block_size, split_tokens, scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_T=_dot_dtype(k_cache), DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _decode_merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out


def prefill_attention(
    q,  # [T, heads, D], the whole flattened batch
    k_cache, v_cache,
    packed: PackedPrefills,
    scale: float,
    out,  # [T, heads, D]; only the chunks' rows are written
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
):
    _check_pool(k_cache, v_cache)
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    block_m = max(block_m, 16, triton.next_power_of_2(group))
    grid = (triton.cdiv(packed.max_tokens, block_m // group), packed.chunks.shape[0], kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, packed.chunks, packed.tables, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
        block_size, scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), DOT_T=_dot_dtype(k_cache),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


@dataclass
class TritonStep:
    """The metadata as the kernels want it, derived once per step for every layer."""

    slots: torch.Tensor  # [T] on the pool's device
    num_decodes: int
    decode_tables: torch.Tensor | None
    decode_lens: torch.Tensor | None
    prefills: PackedPrefills | None

    @classmethod
    def of(cls, meta: AttentionMetadata, device: torch.device) -> "TritonStep":
        def dev(t):
            return None if t is None else t.to(device, non_blocking=True)

        packed = pack_prefills(meta.prefills, device) if meta.prefills else None
        return cls(dev(meta.slot_mapping), meta.num_decodes, dev(meta.decode_block_tables), dev(meta.decode_context_lens), packed)


class TritonAttention:
    name = "triton"
    # Every launch's grid comes from shapes and host ints (see above): a decode step replays
    # as a CUDA graph (model/cuda_graphs.py).
    graph_capturable = True

    def prepare(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> TritonStep:
        return TritonStep.of(meta, k_cache.device)

    def write_kv(self, k_cache, v_cache, k, v, step: TritonStep) -> None:
        write_kv(k_cache, v_cache, k, v, step.slots)

    def forward(self, q, k_cache, v_cache, step: TritonStep, scale: float) -> torch.Tensor:
        return attend(q, k_cache, v_cache, step, scale)


def attend(q, k_cache, v_cache, step: TritonStep, scale: float, out=None, split_tokens=None):
    """Decodes first, then the prefill chunks."""
    out = torch.empty_like(q) if out is None else out
    nd = step.num_decodes
    if nd:
        decode_attention(q[:nd], k_cache, v_cache, step.decode_tables, step.decode_lens, scale, out=out[:nd], split_tokens=split_tokens)
    if step.prefills is not None:
        prefill_attention(q, k_cache, v_cache, step.prefills, scale, out)
    return out


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out=None, split_tokens=None):
    """attend() from plain metadata, for tests and benchmarks (the model prepares once per step)."""
    return attend(q, k_cache, v_cache, TritonStep.of(meta, q.device), scale, out, split_tokens)
