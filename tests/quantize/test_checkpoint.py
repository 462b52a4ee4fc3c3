"""`tokenmill quantize`'s pipeline and checkpoint writer on the tiny random Llama (fast): every
format written, loaded back through the model loader, equal to what was quantized, and run on
the int4 kernel with the outputs of the dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.real import sequence_logits
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import ModelLoadError, load_model
from tokenmill.model.packed import GroupQuantWeight
from tokenmill.model.quant import Int4Linear, make_linear
from tokenmill.quantize.checkpoint import write_checkpoint
from tokenmill.quantize.pipeline import quantize_model
from tokenmill.quantize.spec import QuantizeSpec

CALIB = "The quick brown fox jumps over the lazy dog. " * 20


def model(cfg, weights, quantization):
    return LlamaForCausalLM(cfg, weights, torch.float32, lambda w, b: make_linear(w, b, torch.float32, quantization, 32),
                            max_positions=256)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")[1]


@pytest.mark.parametrize("method,fmt", [("rtn", "gptq"), ("gptq", "gptq_v2"), ("awq", "awq"), ("gptq", "compressed-tensors")])
def test_written_checkpoint_loads_back_and_runs_int4(tiny, tmp_path, method, fmt):
    spec = QuantizeSpec(method=method, bits=4, group_size=32, format=fmt, seq_len=64, calib_generate=0)  # formats, not calibration
    result = quantize_model(tiny.config, tiny.weights, tiny.tokenizer, spec, CALIB)
    out = tmp_path / fmt
    write_checkpoint(out, tiny.config, tiny.tokenizer, result.weights, spec, None)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == {"gptq_v2": "gptq"}.get(fmt, fmt)

    lm = load_model(str(out))
    for name, w in result.weights.items():
        got = lm.weights[name]
        if isinstance(w, GroupQuantWeight):
            assert isinstance(got, GroupQuantWeight), name
            assert torch.equal(got.q, w.q) and torch.equal(got.zero, w.zero), name
            assert torch.allclose(got.scale, w.scale, rtol=1e-3), name  # float16 in the file
        else:
            assert torch.allclose(got, w, rtol=1e-3, atol=1e-4), name
    assert lm.tokenizer.encode("a fox and a dog") == tiny.tokenizer.encode("a fox and a dog")

    m = model(lm.config, lm.weights, "auto")
    assert sum(isinstance(x, Int4Linear) for x in m.modules()) == 4 * lm.config.num_layers
    ref = model(lm.config, {k: v if isinstance(v, torch.Tensor) else v.dequantize() for k, v in lm.weights.items()}, "none")
    ids = tiny.tokenizer.encode(CALIB[:200])
    a, b = sequence_logits(m, ids), sequence_logits(ref, ids)
    # the int4 kernel runs bf16 activations: close, not equal
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_awq_folds_keep_the_float_function(tiny):
    """AWQ's scales are folded (1/s into the norm, s into the weights): before rounding, the
    model computes what it did; so at 8 bits its outputs stay next to the float model's."""
    spec = QuantizeSpec(method="awq", bits=8, group_size=32, format="gptq_v2", seq_len=64)
    result = quantize_model(tiny.config, tiny.weights, tiny.tokenizer, spec, CALIB)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(result.weights[norm], tiny.weights[norm])  # a scale was folded in
    deq = {k: v if isinstance(v, torch.Tensor) else v.dequantize() for k, v in result.weights.items()}
    ids = tiny.tokenizer.encode(CALIB[:200])
    a = sequence_logits(model(tiny.config, deq, "none"), ids)
    b = sequence_logits(model(tiny.config, tiny.weights, "none"), ids)
    assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_malformed_quantized_checkpoint_names_the_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = QuantizeSpec(method="rtn", bits=4, group_size=32)
    result = quantize_model(tiny.config, tiny.weights, tiny.tokenizer, spec)
    write_checkpoint(tmp_path, tiny.config, tiny.tokenizer, result.weights, spec, None)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.qweight"):
        load_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="quant_method 'hqq'"):
        load_model(str(tmp_path))
