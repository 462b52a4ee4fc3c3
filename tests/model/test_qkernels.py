"""tokenmill's C++ int4/int8 linears (qkernels.py) against a float64 reference over the very
weights they hold, on every format and on odd shapes; and batch invariance: a row's output bits
are the same alone, inside a batch of 64 and at another thread count.

The kernel rounds each row's activations to int8 per block of 32 (scale amax / 127, round half
to even), as llama.cpp does, then sums exact integer products and applies the scales in float32.
Stated tolerance, element by element, with x' the activations those integers stand for:
- |y - x' @ W.T| <= 1e-5 * (|x'| @ |W|.T): the float32 rounding of the scaled block sums;
- |y - x @ W.T| <= |x' - x| @ |W|.T + 1e-5 * (|x'| @ |W|.T): the int8 rounding of x (at most
  amax / 254 per input) through the weights, plus the above. On random data that is about 0.5%
  of the output's scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from tokenmill.model import cpp_build, qkernels
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.layers import weight_nbytes
from tokenmill.model.quant import (
    Int4Linear,
    Int8Linear,
    int4_from_kernel_layout,
    int4_kernel_layout,
    int4_kernel_layout_from_gguf,
    int8_activations,
    int8_from_kernel_layout,
    int8_kernel_layout,
    make_linear,
    pack_int4,
)

ROWS = [1, 2, 7, 63, 64, 65, 513]


@pytest.fixture(scope="module", autouse=True)
def built():
    if qkernels.kernel() is None:
        pytest.fail("the quantized linear kernel did not build (g++ and ninja are installed by scripts/install.sh)")


def gguf(qtype: Q, out: int, inp: int, seed: int = 0) -> QuantizedWeight:
    w = np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32)
    return QuantizedWeight(quantize(w, qtype), qtype, (out, inp))


def group_int4(out: int, inp: int, group: int, seed: int = 0) -> Int4Linear:
    # GPTQ/AWQ style: q in 0..15, a scale and a zero (the value of q = 8) per group.
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.int32)
    scale = torch.rand(out, inp // group, generator=g) * 0.02 + 0.005
    zero = torch.randn(out, inp // group, generator=g) * 0.01
    return Int4Linear(q, scale, zero, group, None, torch.float32)


def per_row_int8(out: int, inp: int, seed: int = 0) -> Int8Linear:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return make_linear(w, None, torch.float32, "int8", 32)


# (name, builder): out and in sizes that are not multiples of the kernel's tiles (4, 32 columns;
# 8 lanes) where the format allows: GGUF blocks and int4 groups need in % 32 == 0, per-row int8 none.
CASES = {
    "Q4_0": lambda: make_linear(gguf(Q.Q4_0, 97, 160), None, torch.float32, "auto", 32),
    "Q4_1": lambda: make_linear(gguf(Q.Q4_1, 97, 160), None, torch.float32, "auto", 32),
    "Q8_0": lambda: make_linear(gguf(Q.Q8_0, 97, 160), None, torch.float32, "auto", 32),
    "int4 group 64": lambda: group_int4(37, 192, 64),
    "int4 group 128": lambda: group_int4(70, 256, 128),
    "int8 per row": lambda: per_row_int8(33, 101),
}


def reference(lin, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x' @ W.T in float64 over the module's own dequantized weights, |x'| @ |W|.T, and the
    int8 rounding's bound |x' - x| @ |W|.T)."""
    w = lin.dequantized().double()
    xq = int8_activations(x, torch.float64)
    return xq @ w.t(), xq.abs() @ w.abs().t(), (xq - x.double()).abs() @ w.abs().t()


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_float_reference(case):
    lin = CASES[case]()
    g = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, lin.in_features, generator=g)
        y = lin(x)
        assert y.dtype == torch.float32 and y.shape == (rows, lin.out_features)
        ref, mag, rounding = reference(lin, x)
        err = (y.double() - ref).abs()
        assert (err <= 1e-5 * mag + 1e-30).all(), f"{case} rows={rows}: max err {err.max().item():.3g}"
        exact = x.double() @ lin.dequantized().double().t()
        assert ((y.double() - exact).abs() <= rounding + 1e-5 * mag).all()
        assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()  # about 0.5% here


@pytest.mark.parametrize("rows", [5, 17])  # 17: AMX's tiles where the OS grants them
def test_non_finite_inputs_poison_only_their_rows(rows):
    lin = CASES["Q4_1"]()
    x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(4))
    x[1, 7], x[3, 40] = float("nan"), float("inf")
    y = lin(x)
    assert y[[1, 3]].isnan().all()
    rest = [i for i in range(rows) if i not in (1, 3)]
    assert not y[rest].isnan().any()
    assert torch.equal(y[rest], lin(x[rest]))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_weights_held_exactly_in_the_file_size(qtype):
    # The module's weights are the file's (gguf's dequantizer gives the same floats) and take
    # no more bytes than the file's blocks: no dense copy anywhere.
    w = gguf(qtype, 64, 256)
    lin = make_linear(w, None, torch.float32, "auto", 32)
    assert torch.equal(lin.dequantized(), w.dequantize())
    assert weight_nbytes(lin) == sum(b.numel() * b.element_size() for b in lin.buffers())
    assert weight_nbytes(lin) <= w.nbytes


@pytest.mark.parametrize("case", CASES)
def test_a_rows_bits_do_not_depend_on_its_batch_or_threads(case):
    lin = CASES[case]()
    x = torch.randn(64, lin.in_features, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = lin(x)
        for i in (0, 3, 31, 63):
            assert torch.equal(lin(x[i : i + 1]), batch[i : i + 1])  # alone
            assert torch.equal(lin(x[i : i + 2])[0], batch[i])  # in a few rows (the few-rows paths)
            assert torch.equal(lin(x[i : i + 3])[0], batch[i])
        assert torch.equal(lin(x[5:60]), batch[5:60])  # a row's position in the batch does not matter
        torch.set_num_threads(1)
        assert torch.equal(lin(x), batch)
        assert torch.equal(lin(x[7:8]), batch[7:8])
    finally:
        torch.set_num_threads(threads)


def test_torch_fallback_where_the_kernel_is_missing(monkeypatch):
    lin = CASES["Q4_1"]()
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(3))
    _, mag, _ = reference(lin, x)
    want = lin(x).double()
    monkeypatch.setattr(qkernels, "kernel", lambda: None)
    # the fallback rounds the activations as the kernel does, then multiplies in float32
    assert ((lin(x).double() - want).abs() <= 2e-5 * mag).all()


def test_bad_shapes_are_refused():
    k = qkernels.kernel()
    lin = CASES["Q4_1"]()
    with pytest.raises(RuntimeError, match="in_features"):
        k.int4_linear(torch.randn(2, 96), lin.packed, lin.scale, lin.minimum, 32, lin.out_features)
    with pytest.raises(ValueError, match="multiple of 32"):
        group_int4(8, 96, 48)


def test_isa_flags_name_instruction_sets_never_native_or_amx():
    flags = "fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni amx_tile amx_bf16 avx512_bf16"
    got = cpp_build.isa_flags(flags)
    assert got == ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
    assert not any("amx" in f.lower() or "native" in f for f in got)
    # AMX-INT8 listed: only a define; the tile code has its own target and runs where the OS grants it
    assert cpp_build.isa_flags(flags + " amx_int8") == [*got, "-DTM_AMX_LISTED"]
    assert cpp_build.isa_flags("fpu sse2 avx avx2 f16c") == ["-mf16c"]  # AVX2 without FMA: the scalar path


@pytest.mark.parametrize("out,inp", [(1, 32), (8, 64), (13, 96), (97, 160)])
def test_kernel_layouts_round_trip(out, inp):
    g = torch.Generator().manual_seed(5)
    q4 = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.int32)
    assert torch.equal(int4_from_kernel_layout(int4_kernel_layout(q4), out), q4)
    assert torch.equal(int4_kernel_layout_from_gguf(pack_int4(q4)), int4_kernel_layout(q4))  # GGUF nibbles, repacked
    q8 = torch.randint(-128, 128, (out, inp + 5), generator=g, dtype=torch.int32).to(torch.int8)
    packed = int8_kernel_layout(q8)
    assert packed.shape == (-(-out // 8), -(-(inp + 5) // 32) * 8, 32)
    assert torch.equal(int8_from_kernel_layout(packed, out, inp + 5), q8)
    # byte 4j + i of a 32-byte group holds input 4t + i of column j
    assert packed[0, 1, 4 * min(out - 1, 3) + 2] == q8[min(out - 1, 3), 4 + 2]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("out,inp", [(1, 32), (13, 96), (16, 544), (97, 160)])
def test_gguf_blocks_repacked_in_cpp_give_the_torch_paths_buffers(qtype, out, inp, monkeypatch):
    # Start-up repacks the file's blocks in C++ (qkernels' int4/int8_from_gguf); torch's path
    # stays as the fallback and the reference, byte for byte, padding columns included. The
    # file's mapping is read-only: so is the source here.
    w = gguf(qtype, out, inp, seed=out)
    w.data.setflags(write=False)
    fast = make_linear(w, None, torch.float32, "auto", 32)
    monkeypatch.setattr(qkernels, "kernel", lambda: None)
    slow = make_linear(w, None, torch.float32, "auto", 32)
    assert fast.state_dict().keys() == slow.state_dict().keys()
    for name, got in fast.state_dict().items():
        want = slow.state_dict()[name]
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous(), name
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert fast.file_values if qtype == Q.Q8_0 else fast.minimum.numel() == (0 if qtype == Q.Q4_0 else fast.scale.numel())


def test_gguf_blocks_of_the_wrong_size_or_layout_are_refused():
    k = qkernels.kernel()
    blocks = np.zeros((8, 40), np.uint8)  # 8 rows of two Q4_1 blocks
    assert [t.shape for t in k.int4_from_gguf(blocks, 8, 64, True)] == [(1, 8, 32), (1, 2, 8), (1, 2, 8)]
    with pytest.raises(RuntimeError, match="expected 320 bytes"):
        k.int4_from_gguf(blocks[:, :20], 8, 64, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        k.int4_from_gguf(np.zeros((8, 80), np.uint8)[:, ::2], 8, 64, True)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        k.int8_from_gguf(blocks, 8, 60)
    with pytest.raises(RuntimeError, match="expected"):
        k.int8_from_gguf(np.zeros(320, np.float32), 8, 64)  # not bytes


@pytest.mark.parametrize("drop", [("amx_int8",), ("avx512_vnni",), ("avx2",)],
                         ids=["vnni without amx", "avx2 without vnni", "scalar"])
def test_every_instruction_set_gives_the_same_bits(drop, monkeypatch):
    # The integer sums are exact on every path (AMX's tile multiply, VNNI's dpbusd, AVX2's
    # maddubs + madd, plain loops) and the float steps are the same, so a kernel built for fewer
    # instruction sets (another machine of this kind) must give this one's bits.
    flags = cpp_build.cpu_flags()
    if not all(f in flags.split() for f in drop):
        pytest.skip(f"this CPU lists no {drop[0]}: the kernel already runs that path here")
    if drop == ("amx_int8",) and not qkernels.kernel().isa().endswith("+amx"):
        pytest.skip("AMX is listed but the OS does not grant it: the VNNI path already runs here")
    monkeypatch.setattr(cpp_build, "cpu_flags", lambda: " ".join(f for f in flags.split() if f not in drop))
    other = cpp_build.build(qkernels.PREFIX, qkernels._SOURCE, qkernels.FUNCTIONS, qkernels.CFLAGS)
    assert other.isa() != qkernels.kernel().isa()
    g = torch.Generator().manual_seed(6)
    for case, make in CASES.items():
        lin = make()
        for rows in (1, 3, 5, 9, 17, 64):  # 9 and more: AMX's tiles of 16 rows, where granted
            x = torch.randn(rows, lin.in_features, generator=g)
            assert torch.equal(lin._kernel(other, x), lin._kernel(qkernels.kernel(), x)), (case, rows)
