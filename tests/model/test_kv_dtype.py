"""KV pools in another dtype than the model's (tokenmill/model/attention/kv_dtype.py): int8 rows
round-trip within half a step of their scale; the C++ kernel reads 16-bit and int8 pools as the
torch reference reads them dequantized, and stays close to the float pool; the torch backend
writes and reads them; the backend choice per device and pool dtype."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.attention import (
    AttentionMetadata,
    PrefillChunk,
    TorchAttention,
    choose_backend,
    torch_paged_attention,
    torch_write_kv,
)
from tokenmill.model.attention import backend as backend_module
from tokenmill.model.attention import cpu_backend
from tokenmill.model.attention.cpu_backend import CpuAttention
from tokenmill.model.attention.kv_dtype import SCALE_BYTES, from_pool, kv_token_bytes, quantize_int8, row_width, to_pool
from tests.model.test_cpu_attention import CAN_BUILD, CASES, decode_case

KV_DTYPES = [torch.bfloat16, torch.float16, torch.int8]
# Relative error of attention over a rounded pool against the float32 pool: 16-bit rounding
# (bf16 keeps 8 bits of mantissa, fp16 11) and int8's half a step of amax / 127 per row.
POOL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.int8: 2e-2}


def test_int8_rows_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 2, 50)[:, None, None]  # rows of any magnitude
    x[7, 1] = 0  # an all-zero row keeps scale 0 and reads back as zeros
    rows = quantize_int8(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 64 + SCALE_BYTES)
    back = from_pool(rows, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()
    assert back[7, 1].eq(0).all()
    assert (rows[..., :64].abs() <= 127).all()


def test_pool_sizes():
    # SmolLM2: 30 layers, 3 KV heads, head_dim 64. 16-bit halves float32; int8 rows add a 4-byte scale.
    f32 = kv_token_bytes(30, 3, 64, torch.float32)
    assert f32 == 2 * 30 * 3 * 64 * 4
    assert kv_token_bytes(30, 3, 64, torch.bfloat16) * 2 == f32 == kv_token_bytes(30, 3, 64, torch.float16) * 2
    assert kv_token_bytes(30, 3, 64, torch.int8) == 2 * 30 * 3 * 68
    assert row_width(64, torch.int8) == 68 and row_width(64, torch.bfloat16) == 64


def pools(case, q_dtype, kv_dtype, seed=0):
    heads, kv_heads, dim, block, lens = case
    q, k_float, v_float, meta = decode_case(heads, kv_heads, dim, block, lens, torch.float32, seed=seed)
    return q.to(q_dtype), k_float, v_float, to_pool(k_float, kv_dtype), to_pool(v_float, kv_dtype), meta


@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("q_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}b{c[3]}")
def test_kernel_reads_the_pool_as_the_reference_dequantizes_it(case, q_dtype, tol, kv_dtype):
    q, k_float, v_float, k_pool, v_pool, meta = pools(case, q_dtype, kv_dtype)
    dim = q.shape[-1]
    rows = torch.arange(q.shape[0])
    out = torch.full(q.shape, float("nan"), dtype=q_dtype)
    cpu_backend.kernel()(q, k_pool, v_pool, meta.decode_block_tables, rows, meta.decode_context_lens, dim**-0.5, out)
    assert not out.isnan().any()
    # The same values in float32: what the kernel must compute, up to float summation order.
    want = torch_paged_attention(q.float(), from_pool(k_pool, torch.float32), from_pool(v_pool, torch.float32), meta, dim**-0.5)
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < tol, rel
    # And the pool's rounding costs little against the float32 pool.
    exact = torch_paged_attention(q.float(), k_float, v_float, meta, dim**-0.5)
    rel = ((out.float() - exact).norm() / exact.norm()).item()
    assert rel < POOL_TOL[kv_dtype] + (tol if q_dtype != torch.float32 else 0), rel


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("attention", ["torch", "cpu"])
def test_backends_write_and_attend_over_the_pool(kv_dtype, attention):
    # Decodes and a prefill chunk written through the backend's write path into an empty pool of
    # that dtype: outputs close to the same steps over a float32 pool.
    if attention == "cpu" and not CAN_BUILD:
        pytest.skip("no g++/ninja")
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    n = 40
    k = torch.randn(n, kv_heads, dim, generator=g)
    v = torch.randn(n, kv_heads, dim, generator=g)
    q = torch.randn(n, heads, dim, generator=g)
    table = torch.tensor([5, 2, 7])
    slots = torch.tensor([table[t // block] * block + t % block for t in range(n)])
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=0, decode_block_tables=None, decode_context_lens=None,
                             prefills=[PrefillChunk(0, n, n, table)])
    backend = TorchAttention() if attention == "torch" else choose_backend(torch.device("cpu"), torch.float32, kv_dtype)
    assert isinstance(backend, CpuAttention) == (attention == "cpu")

    def run(pool_dtype, b):
        shape = (8, kv_heads, block, row_width(dim, pool_dtype))
        k_cache, v_cache = torch.zeros(shape, dtype=pool_dtype), torch.zeros(shape, dtype=pool_dtype)
        step = b.prepare(meta, k_cache)
        b.write_kv(k_cache, v_cache, k, v, step)
        return b.forward(q, k_cache, v_cache, step, dim**-0.5), k_cache

    got, k_cache = run(kv_dtype, backend)
    assert torch.equal(k_cache[5, :, 3], to_pool(k[3], kv_dtype))  # token 3 at its slot, as to_pool makes it
    want, _ = run(torch.float32, TorchAttention())
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < POOL_TOL[kv_dtype], rel
    # torch_write_kv, the reference write from plain slots, writes the same pool.
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(k_cache)
    torch_write_kv(k2, v2, k, v, slots)
    assert torch.equal(k2, k_cache)


def test_backend_choice_per_pool_dtype():
    cpu = torch.device("cpu")
    if CAN_BUILD:
        for kv in KV_DTYPES + [torch.float32]:
            assert isinstance(choose_backend(cpu, torch.float32, kv), CpuAttention)
    # On CUDA an int8 pool gets the torch path (Triton's kernels read float pools only); this
    # needs no GPU: the choice is made from the device's type.
    assert type(backend_module._choose(torch.device("cuda"), torch.bfloat16, torch.int8)) is TorchAttention


@pytest.mark.slow  # about a minute loaded: the default model dequantized, three 275-token prefills
@pytest.mark.skipif(not CAN_BUILD, reason="no g++/ninja")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8], ids=str)  # the CPU default, the narrowest
def test_default_model_perplexity_over_a_narrow_pool(kv_dtype):
    from tests.model import real

    ppl_f, ppl_q, agree, n = real.perplexity_vs_float_kv(kv_dtype)
    print(f"perplexity over a float32 KV {ppl_f:.4f}, {kv_dtype} KV {ppl_q:.4f}; next-token agreement {agree:.3f} over {n} tokens")
    assert ppl_f < 60  # a sane model on plain English prose
    assert abs(ppl_q - ppl_f) / ppl_f < 0.005
    assert agree >= 0.9
