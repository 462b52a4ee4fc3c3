"""The C++ CPU attention kernel (tokenmill/model/attention/cpu_backend.py) against the torch
reference (attention.torch_paged_attention) on random pools: GQA ratios, head dims, block sizes,
context lengths on and off block boundaries, strided queries, float32 and bfloat16; a row's bits
the same decoded, in a chunk or beside other sequences; and which backend a device gets."""

from __future__ import annotations

import shutil

import pytest
import torch

from tokenmill.model.attention import AttentionMetadata, PrefillChunk, TorchAttention, choose_backend, torch_paged_attention
from tokenmill.model.attention import cpu_backend
from tokenmill.model.attention.cpu_backend import CpuAttention
from tokenmill.model.attention.kv_dtype import to_pool

CAN_BUILD = shutil.which("g++") is not None and shutil.which("ninja") is not None


def test_kernel_builds_where_a_compiler_exists():
    if not CAN_BUILD:
        pytest.skip("no g++/ninja: the torch path runs instead")
    assert cpu_backend.kernel() is not None


def decode_case(heads, kv_heads, dim, block, lens, dtype, seed=0, num_blocks=64):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g).to(dtype)
    max_blocks = max(-(-n // block) for n in lens)
    # Distinct random blocks per sequence, padded with block 0 as the runner pads.
    perm = torch.randperm(num_blocks, generator=g)
    tables, used = [], 0
    for n in lens:
        nb = -(-n // block)
        tables.append(perm[used : used + nb].tolist() + [0] * (max_blocks - nb))
        used += nb
    tables = torch.tensor(tables)
    ctx = torch.tensor(lens)
    # Queries as the model makes them: a slice of a wider q|k tensor, so rows are strided.
    wide = torch.randn(len(lens), heads + kv_heads, dim, generator=g).to(dtype)
    q = wide[:, :heads]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long), num_decodes=len(lens),
        decode_block_tables=tables, decode_context_lens=ctx, prefills=[],
    )
    return q, k_cache, v_cache, meta


CASES = [
    # heads, kv_heads, dim, block, context lengths
    (9, 3, 64, 16, [1, 16, 17, 40, 300]),  # SmolLM2's shape
    (8, 8, 64, 16, [5, 32, 33]),  # no GQA
    (8, 2, 128, 8, [7, 8, 9, 64]),  # GQA 4, head dim 128
    (16, 2, 64, 16, [100, 3]),  # GQA 8
    (4, 1, 48, 4, [1, 2, 3, 4, 5, 13]),  # odd head dim, tiny blocks
    # the decode rows' register versions (1-4 heads per KV head at head dim 64, 1-2 at 128)
    (8, 4, 64, 16, [3, 19, 64]),  # GQA 2
    (12, 3, 64, 16, [2, 35]),  # GQA 4
    (4, 4, 128, 16, [1, 5, 33, 70]),  # no GQA, head dim 128
    (8, 4, 128, 16, [2, 40]),  # GQA 2, head dim 128
]


@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}b{c[3]}")
def test_kernel_matches_torch_reference(case, dtype, tol):
    heads, kv_heads, dim, block, lens = case
    q, k_cache, v_cache, meta = decode_case(heads, kv_heads, dim, block, lens, dtype)
    want = torch_paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, dim**-0.5)
    out = torch.full(q.shape, float("nan"), dtype=dtype)  # poisoned: every row must be written
    rows = torch.arange(len(lens))
    cpu_backend.kernel()(q, k_cache, v_cache, meta.decode_block_tables, rows, meta.decode_context_lens, dim**-0.5, out)
    assert not out.isnan().any()
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < tol, rel


@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
def test_backend_runs_decodes_and_prefill_chunks_like_the_reference():
    q, k_cache, v_cache, meta = decode_case(9, 3, 64, 16, [20, 45], torch.float32, seed=1)
    chunk_q = torch.randn(6, 9, 64, generator=torch.Generator().manual_seed(2))
    q = torch.cat([q, chunk_q])
    meta.prefills = [PrefillChunk(start=2, num_tokens=6, context_len=30, block_table=torch.tensor([40, 41]))]
    meta.slot_mapping = torch.zeros(8, dtype=torch.long)
    backend = choose_backend(torch.device("cpu"), torch.float32)
    assert isinstance(backend, CpuAttention)
    got = backend.forward(q, k_cache, v_cache, backend.prepare(meta, k_cache), 0.125)
    want = torch_paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def prefill_meta(first_row: int, chunks: list[tuple[int, int]], table: torch.Tensor, block: int, decodes=()):
    """Decodes (context lengths) of the same sequence first, then chunks (num_tokens, context_len)."""
    nd = len(decodes)
    prefills, row = [], first_row + nd
    for n, ctx in chunks:
        prefills.append(PrefillChunk(start=row, num_tokens=n, context_len=ctx, block_table=table[: -(-ctx // block)]))
        row += n
    tables = table[None, :].expand(nd, -1).contiguous() if nd else None
    return AttentionMetadata(
        slot_mapping=torch.zeros(row, dtype=torch.long), num_decodes=nd, decode_block_tables=tables,
        decode_context_lens=torch.tensor(list(decodes)) if nd else None, prefills=prefills,
    )


# (heads, kv heads, head dim): SmolLM2's, then shapes of the decode rows' other register
# versions (a decode row takes them, a prefill chunk the general loop) and one without any.
SHAPES = [(9, 3, 64), (4, 4, 64), (8, 4, 64), (12, 3, 64), (4, 4, 128), (8, 4, 128), (8, 2, 128)]


KV_DTYPES = [None, torch.bfloat16, torch.float16, torch.int8]
BITS_CASES = ([(dtype, kv, SHAPES[0]) for dtype in (torch.float32, torch.bfloat16) for kv in KV_DTYPES]
              + [(torch.float32, kv, shape) for shape in SHAPES[1:] for kv in KV_DTYPES])


@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
@pytest.mark.parametrize("dtype, kv_dtype, shape", BITS_CASES, ids=lambda v: f"h{v[0]}kv{v[1]}d{v[2]}" if isinstance(v, tuple) else str(v))
def test_a_tokens_bits_do_not_depend_on_how_it_is_computed(dtype, kv_dtype, shape):
    # One 70-token sequence (block 16, 5 blocks): its rows prefilled as one chunk, as chunks of
    # 9 (a chunked prefill or a prefix-cache hit), decoded one at a time, verified as a 4-row
    # chunk after decodes of other sequences: bit for bit the same output. In every pool dtype
    # (None: the model's), as the pool is written: rounded or quantized.
    heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(7)
    block, n = 16, 70
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    k_cache = to_pool(torch.randn(32, kv_heads, block, dim, generator=g), kv_dtype)
    v_cache = to_pool(torch.randn(32, kv_heads, block, dim, generator=g), kv_dtype)
    table = torch.randperm(32, generator=g)[:5]
    q = torch.randn(n, heads, dim, generator=g).to(dtype)
    backend = choose_backend(torch.device("cpu"), dtype, kv_dtype)
    assert isinstance(backend, CpuAttention)

    def run(qq, meta):
        return backend.forward(qq, k_cache, v_cache, backend.prepare(meta, k_cache), 0.125)

    whole = run(q, prefill_meta(0, [(n, n)], table, block))
    chunks = [(min(9, n - s), min(s + 9, n)) for s in range(0, n, 9)]
    pieces = [run(q[ctx - m : ctx], prefill_meta(0, [(m, ctx)], table, block)) for m, ctx in chunks]
    assert torch.equal(torch.cat(pieces), whole)
    decoded = [run(q[i : i + 1], prefill_meta(0, [], table, block, decodes=[i + 1])) for i in range(n)]
    assert torch.equal(torch.cat(decoded), whole)
    # Beside them in the batch: two decode rows of this sequence, then its 4-row verify chunk.
    mixed_q = torch.cat([q[10:11], q[40:41], q[60:64]])
    mixed = run(mixed_q, prefill_meta(0, [(4, 64)], table, block, decodes=[11, 41]))
    assert torch.equal(mixed, torch.cat([whole[10:11], whole[40:41], whole[60:64]]))


def test_torch_backend_where_the_kernel_does_not_run(monkeypatch):
    assert type(choose_backend(torch.device("cpu"), torch.float16)) is TorchAttention  # not compiled for it
    monkeypatch.setattr(cpu_backend, "kernel", lambda: None)
    assert type(choose_backend(torch.device("cpu"), torch.float32)) is TorchAttention


@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
def test_kernel_refuses_a_context_past_its_table():
    q, k_cache, v_cache, meta = decode_case(9, 3, 64, 16, [20, 45], torch.float32, seed=4)
    lens = meta.decode_context_lens.clone()
    lens[1] = meta.decode_block_tables.shape[1] * 16 + 1
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu_backend.kernel()(q, k_cache, v_cache, meta.decode_block_tables, torch.arange(2), lens, 0.125, torch.empty(q.shape))


def test_a_steps_rows_pad_each_table_and_name_each_rows_sequence_and_context():
    """CpuStep.rows: the decode rows' tables (padded already) as one block, then a table per
    prompt chunk, padded with zeros to the widest; each row's sequence and context."""
    tables, lens = torch.tensor([[3, 7, 0], [1, 2, 9]]), torch.tensor([20, 40])
    decode_only = cpu_backend.CpuStep(AttentionMetadata(torch.tensor([50, 41]), 2, tables, lens, []), 16).rows
    assert torch.equal(decode_only[0], tables) and decode_only[1].tolist() == [0, 1] and decode_only[2].tolist() == [20, 40]
    chunks = [PrefillChunk(2, 2, 5, torch.tensor([4])), PrefillChunk(4, 1, 40, torch.tensor([5, 6, 8, 11]))]
    mixed = cpu_backend.CpuStep(AttentionMetadata(torch.arange(5), 2, tables, lens, chunks), 16).rows
    assert mixed[0].tolist() == [[3, 7, 0, 0], [1, 2, 9, 0], [4, 0, 0, 0], [5, 6, 8, 11]]
    assert mixed[1].tolist() == [0, 1, 2, 2, 3] and mixed[2].tolist() == [20, 40, 4, 5, 40]
    prompts_only = cpu_backend.CpuStep(AttentionMetadata(torch.arange(3), 0, None, None, chunks), 16).rows
    assert prompts_only[0].tolist() == [[4, 0, 0, 0], [5, 6, 8, 11]] and prompts_only[1].tolist() == [0, 0, 1]
    assert prompts_only[2].tolist() == [4, 5, 40]
    assert all(t.dtype == torch.long for t in mixed + decode_only + prompts_only)
