"""The checkpoint formats (model/packed): bit packing against an independent implementation
(the `compressed-tensors` package, llm-compressor's own), each format's write -> read round
trip, GPTQ's v1 zero-point convention, and the linears a quantized weight runs on."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

from tokenmill.model.packed import GroupQuantWeight, read_quantized
from tokenmill.model.packed import awq, compressed_tensors as ct, gptq
from tokenmill.model.packed.bits import pack_int32, unpack_int32
from tokenmill.model.quant import Int4Linear, Int8Linear, make_linear


def random_weight(out=96, inp=128, bits=4, group=32, seed=0, sym=False) -> GroupQuantWeight:
    g = torch.Generator().manual_seed(seed)
    groups = inp // group
    q = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.int32)
    zero = (torch.full((out, groups), 1 << (bits - 1), dtype=torch.int32) if sym
            else torch.randint(1, 1 << bits, (out, groups), generator=g, dtype=torch.int32))
    scale = (torch.rand(out, groups, generator=g) * 0.05 + 0.001).half().float()  # the files store fp16
    return GroupQuantWeight(q, scale, zero, torch.arange(inp) // group, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_matches_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (7, 200), generator=g)  # 200: not a multiple of 32
    ours = pack_int32(values, bits)
    theirs = pack_to_int32((values - (1 << (bits - 1))).to(torch.int8), bits)  # signed in, offset inside
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(theirs, bits, 200), values.to(torch.int32))
    back = unpack_from_int32(ours, bits, torch.Size([7, 200])).to(torch.int32) + (1 << (bits - 1))
    assert torch.equal(back, values.to(torch.int32))


def test_packing_refuses_values_outside_the_bits():
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_int32(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_compressed_tensors_tensors_decompress_with_the_package(bits, sym):
    """What tokenmill writes, the package unpacks to the same signed q and zero points; and its
    own packing of those reads back in tokenmill as the same weight."""
    w = random_weight(bits=bits, sym=sym)
    t = ct.write(w, "layer.", sym)
    offset = 1 << (bits - 1)
    q_signed = unpack_from_int32(t["layer.weight_packed"], bits, torch.Size(w.shape))
    assert torch.equal(q_signed.to(torch.int32), w.q - offset)
    if not sym:
        zp = unpack_from_int32(t["layer.weight_zero_point"], bits, torch.Size(w.zero.shape), packed_dim=0)
        assert torch.equal(zp.to(torch.int32), w.zero - offset)
        theirs_zp = pack_to_int32((w.zero - offset).to(torch.int8), bits, packed_dim=0)
        assert torch.equal(theirs_zp, t["layer.weight_zero_point"])
    theirs = {"layer.weight_packed": pack_to_int32((w.q - offset).to(torch.int8), bits),
              "layer.weight_scale": w.scale.half(), "layer.weight_shape": torch.tensor(w.shape)}
    if not sym:
        theirs["layer.weight_zero_point"] = pack_to_int32((w.zero - offset).to(torch.int8), bits, packed_dim=0)
    cfg = ct.config(bits, 32, sym, ignore=["lm_head"])
    back = read_quantized(theirs, cfg)["layer.weight"]
    assert torch.equal(back.q, w.q) and torch.equal(back.zero, w.zero) and torch.equal(back.scale, w.scale)


def test_compressed_tensors_config_is_one_the_package_accepts():
    cfg = QuantizationConfig.model_validate(ct.config(4, 64, False, ignore=["lm_head"]))
    scheme = cfg.config_groups["group_0"].weights
    assert (scheme.num_bits, scheme.group_size, scheme.symmetric, scheme.strategy) == (4, 64, False, "group")
    assert cfg.format == "pack-quantized"


@pytest.mark.parametrize("fmt,bits,v2", [("gptq", 4, False), ("gptq", 3, False), ("gptq", 8, False), ("gptq", 4, True),
                                         ("awq", 4, False), ("compressed-tensors", 4, False), ("compressed-tensors", 8, False)])
def test_write_read_round_trip(fmt, bits, v2):
    w = random_weight(bits=bits)
    if fmt == "gptq":
        tensors, cfg = gptq.write(w, "x.", v1=not v2), gptq.config(bits, 32, False, False, v1=not v2)
    elif fmt == "awq":
        tensors, cfg = awq.write(w, "x."), awq.config(bits, 32)
    else:
        tensors, cfg = ct.write(w, "x.", sym=False), ct.config(bits, 32, False, ignore=[])
    back = read_quantized(tensors | {"other.weight": torch.ones(3)}, cfg)
    assert set(back) == {"x.weight", "other.weight"}  # the packed tensors are consumed
    r = back["x.weight"]
    assert torch.equal(r.q, w.q) and torch.equal(r.zero, w.zero) and torch.equal(r.scale, w.scale)
    assert torch.equal(r.g_idx, w.g_idx) and r.bits == bits
    assert torch.equal(r.dequantize(), w.dequantize())


def test_gptq_layout():
    w = random_weight(out=64, inp=128, bits=4)
    t = gptq.write(w, "x.")
    assert t["x.qweight"].shape == (128 * 4 // 32, 64) and t["x.qweight"].dtype == torch.int32
    assert t["x.qzeros"].shape == (4, 64 * 4 // 32) and t["x.scales"].shape == (4, 64)
    assert t["x.scales"].dtype == torch.float16 and t["x.g_idx"].shape == (128,)


def test_gptq_v1_stored_zero_7_reads_as_8():
    """GPTQ v1 files store zero - 1: the symmetric 4-bit zero 8 is stored as 7 (0x77777777)."""
    out, inp = 8, 64
    qweight = pack_int32(torch.full((out, inp), 8), 4).t().contiguous()  # q = 8 everywhere: W = 0
    qzeros = pack_int32(torch.full((2, out), 7), 4)
    assert qzeros[0, 0].item() == 0x77777777
    tensors = {"x.qweight": qweight, "x.qzeros": qzeros, "x.scales": torch.ones(2, out).half()}
    v1 = read_quantized(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32})["x.weight"]
    assert (v1.zero == 8).all() and (v1.dequantize() == 0).all()
    v2 = read_quantized(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"})["x.weight"]
    assert (v2.zero == 7).all() and (v2.dequantize() == 1).all()


def test_gptq_v1_writer_refuses_zero_0():
    w = random_weight()
    w.zero[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq.write(w, "x.")
    gptq.write(w, "x.", v1=False)  # v2 holds it


def test_awq_interleaved_order():
    """Nibbles low to high hold columns 0, 2, 4, 6, 1, 3, 5, 7 of each 8."""
    word = awq.pack(torch.arange(8)[None])[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_act_order_g_idx_restores_channel_order():
    """A GPTQ file with act-order groups (g_idx not k // G) dequantizes each column with its own
    group's scale, wherever the group sits."""
    w = random_weight(out=16, inp=64, bits=4)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled = GroupQuantWeight(w.q, w.scale, w.zero, (torch.arange(64) // 32)[perm], 4)
    t = gptq.write(shuffled, "x.")
    back = read_quantized(t, gptq.config(4, 32, False, True))["x.weight"]
    assert back.group_size is None and back.kernel_format is None  # no kernel: runs dequantized
    deq = back.dequantize()
    for k in range(64):
        g = int(shuffled.g_idx[k])
        expect = (w.q[:, k].float() - w.zero[:, g].float()) * w.scale[:, g]
        assert torch.equal(deq[:, k], expect)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (3, 64), (4, 128)])
def test_int4_kernel_runs_the_weight(bits, group):
    w = random_weight(out=64, inp=256, bits=bits, group=group)
    assert w.kernel_format == "int4"
    lin = make_linear(w, None, torch.float32, "auto", 32)
    assert isinstance(lin, Int4Linear)
    x = torch.randn(3, 256)
    ref = x @ w.dequantize().t()
    assert torch.allclose(lin(x), ref, rtol=0.03, atol=0.03 * ref.abs().max().item())


def test_int8_kernel_runs_symmetric_weights_and_asymmetric_run_float():
    sym = random_weight(out=64, inp=128, bits=8, sym=True)
    lin = make_linear(sym, None, torch.float32, "auto", 32)
    assert isinstance(lin, Int8Linear)
    x = torch.randn(2, 128)
    ref = x @ sym.dequantize().t()
    assert torch.allclose(lin(x), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    asym = random_weight(out=64, inp=128, bits=8)
    assert asym.kernel_format is None and "zero points" in asym.unsupported_reason
    assert torch.allclose(make_linear(asym, None, torch.float32, "auto", 32)(x), x @ asym.dequantize().t(), atol=1e-4)


def test_group_size_the_kernel_cannot_take_runs_dequantized(caplog):
    w = random_weight(out=32, inp=96, bits=4, group=48)
    with caplog.at_level("WARNING"):
        read_quantized(gptq.write(w, "x."), gptq.config(4, 48, False, False))
    assert "group size 48" in caplog.text and "dequantized" in caplog.text
    lin = make_linear(w, None, torch.float32, "auto", 32)
    assert not isinstance(lin, Int4Linear)
    x = torch.randn(2, 96)
    assert torch.allclose(lin(x), x @ w.dequantize().t(), atol=1e-4)


def test_stacked_weights_concatenate_rows():
    a, b = random_weight(out=32, seed=1), random_weight(out=64, seed=2)
    s = GroupQuantWeight.stacked([a, b])
    assert torch.equal(s.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert GroupQuantWeight.stacked([a, random_weight(out=32, bits=3)]) is None


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemm"),
])
def test_unsupported_configs_say_what(cfg, match):
    t = gptq.write(random_weight(), "x.")
    with pytest.raises(ValueError, match=match):
        read_quantized(t, cfg)


def compressed_by_the_package(w: torch.Tensor, preset: str) -> tuple[dict, dict]:
    """(the tensors of one linear named `x.`, the config) as compressed-tensors itself makes them
    for one of its preset schemes: its observer's qparams, its compressor's rounding."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    if args.strategy == "tensor":
        mn, mx = w.amin().reshape(1), w.amax().reshape(1)
    elif args.strategy == "channel":
        mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif args.strategy == "group":
        g = w.reshape(w.shape[0], -1, args.group_size)
        mn, mx = g.amin(-1), g.amax(-1)
    else:  # block
        b0, b1 = args.block_structure
        t = w.reshape(w.shape[0] // b0, b0, w.shape[1] // b1, b1)
        mn, mx = t.amin((1, 3)), t.amax((1, 3))
    scale, zp = calculate_qparams(torch.minimum(mn, torch.zeros_like(mn)), torch.maximum(mx, torch.zeros_like(mx)), args)
    fmt = "float-quantized" if args.type == "float" else "int-quantized"
    compressor = BaseCompressor.load_from_registry(fmt)
    tensors = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    decompressed = compressor.decompress(dict(tensors), scheme)["weight"]
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                             ignore=["lm_head"]).model_dump()
    return {f"x.{k}": v for k, v in tensors.items()} | {"x.decompressed": decompressed}, cfg


@pytest.mark.parametrize("preset,kind", [("W8A8", GroupQuantWeight), ("W8A16", GroupQuantWeight),
                                         ("FP8_DYNAMIC", "fp8"), ("FP8", "fp8"), ("FP8_BLOCK", torch.Tensor)])
def test_int_and_float_quantized_read_as_the_package_decompresses(preset, kind):
    """llm-compressor's W8A8 int8 (channel), W8A16 (group 128) and FP8 (channel, tensor, 128x128
    block) checkpoints: tokenmill reads each linear to the weights the package decompresses."""
    from tokenmill.model.fp8 import Fp8Weight

    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.05
    tensors, cfg = compressed_by_the_package(w, preset)
    want = tensors.pop("x.decompressed").float()
    back = read_quantized(tensors | {"lm_head.weight": torch.ones(4, 4)}, cfg)
    assert set(back) == {"x.weight", "lm_head.weight"}
    r = back["x.weight"]
    assert isinstance(r, Fp8Weight if kind == "fp8" else kind)
    got = r if isinstance(r, torch.Tensor) else r.dequantize()
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset,module", [("W8A8", Int8Linear), ("FP8_DYNAMIC", "Fp8Linear"), ("FP8", "Fp8Linear")])
def test_w8a8_checkpoint_weights_run_their_kernel(preset, module):
    """W8A8 int8 runs the int8 kernel on the file's values; FP8 runs Fp8Linear on the file's e4m3
    values and scales (not requantized), within the activations' rounding of x @ W.T."""
    from tokenmill.model.fp8 import Fp8Linear

    module = Fp8Linear if module == "Fp8Linear" else module
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2)) * 0.05
    tensors, cfg = compressed_by_the_package(w, preset)
    tensors.pop("x.decompressed")
    r = read_quantized(tensors, cfg)["x.weight"]
    lin = make_linear(r, None, torch.float32, "auto", 32)
    assert type(lin) is module
    if module is Fp8Linear:
        assert torch.equal(lin.weight.float(), tensors["x.weight"].float())
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(3))
    ref = x @ r.dequantize().T
    # e4m3 activations keep 3 mantissa bits (relative error <= 2**-4); the int8 kernel's two passes far less
    bound = (x.abs() @ r.dequantize().abs().T) * (2**-4 if module is Fp8Linear else 1e-3)
    assert ((lin(x) - ref).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}},
     "float-quantized"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "channel"}}}},
     "4-bit"),
])
def test_compressed_tensors_schemes_that_do_not_fit_say_what(cfg, match):
    with pytest.raises(ValueError, match=match):
        read_quantized({"x.weight": torch.zeros(16, 16, dtype=torch.int8), "x.weight_scale": torch.ones(16, 1)}, cfg)


@pytest.mark.parametrize("strategy,groups,with_zero", [("group", 4, False), ("channel", 1, True)])
def test_fp8_scales_no_kernel_takes_run_dequantized(strategy, groups, with_zero, caplog):
    """FP8 with group scales, or with zero points, runs dequantized: (w - zp) * scale per group."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(16, groups, generator=g) + 0.5
    tensors = {"x.weight": w, "x.weight_scale": scale}
    want = w.float()
    if with_zero:
        zp = torch.randn(16, groups, generator=g).to(torch.float8_e4m3fn)
        tensors["x.weight_zero_point"] = zp
        want = want - zp.float().repeat_interleave(64 // groups, dim=1)
    want = want * scale.repeat_interleave(64 // groups, dim=1)
    cfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": not with_zero}}}}
    got = read_quantized(tensors, cfg)["x.weight"]
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert "runs dequantized" in caplog.text
