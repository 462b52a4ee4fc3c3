"""Tiny GGUF files written in tmp_path: the loader's name mapping, Q/K un-permutation and
dequantization, and one clear ModelLoadError for every kind of broken file."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from tests.model.gguf_files import _head_dim, write_tiny_gguf
from tests.tiny import tiny_hf_model, tiny_tokenizer
from tokenmill.config import EngineConfig
from tokenmill.model import loader
from tokenmill.model.loader import ModelLoadError, load_model
from tokenmill.model.gguf_blocks import QuantizedWeight


def roundtrip(w: torch.Tensor, qtype: Q | None) -> torch.Tensor:
    if qtype is None or w.ndim != 2 or w.shape[1] % 32:
        return w
    return torch.from_numpy(gguf_dequantize(quantize(w.numpy(), qtype), qtype))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", [None, Q.Q4_1, Q.Q8_0])
def test_weights_come_back_in_hf_layout(tmp_path, arch, qtype):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, arch, qtype)
    m = load_model(str(path), EngineConfig.from_flat(quantization="none"))
    assert m.source == str(path)
    assert set(m.weights) == set(expected)
    for name, w in m.weights.items():
        got = w.dequantize() if isinstance(w, QuantizedWeight) else w
        assert got.dtype == torch.float32
        assert torch.equal(got, roundtrip(expected[name], qtype)), name
    hf = tiny_hf_model(arch).config
    cfg = m.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, _head_dim(hf)
    )
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")


def test_quantized_tensors_stay_quantized_and_tied_head_is_quantized(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", Q.Q8_0)  # qwen2 tiny model has tied embeddings
    m = load_model(str(path), EngineConfig.from_flat(quantization="auto"))
    assert isinstance(m.weights["model.layers.0.mlp.up_proj.weight"], QuantizedWeight)
    assert isinstance(m.weights["model.embed_tokens.weight"], QuantizedWeight)  # rows are looked up as stored
    assert isinstance(m.weights["lm_head.weight"], QuantizedWeight)
    assert "lm_head.weight" not in load_model(str(path), EngineConfig.from_flat(quantization="none")).weights


def test_tokenizer_from_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    tok = load_model(str(path)).tokenizer
    ref = tiny_tokenizer()
    text = "The quick brown fox, 1234 日本語 🙂</s>"
    assert tok.encode(text, add_special_tokens=False) == ref.backend.encode(text).ids
    assert tok.encode("hi")[0] == 0  # add_bos_token from the metadata
    assert tok.eos_token_ids == [1] and tok.bos_token_id == 0
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_tiny_gguf_generates_like_transformers(tmp_path):
    # The un-permuted Q/K must give the same greedy tokens as the HF model whose weights are
    # the GGUF's dequantized ones.
    from tests.tiny import hf_greedy
    from tokenmill import LLM
    from tokenmill.sampling import SamplingParams

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", quantized=None)
    llm = LLM(str(path), quantization="none", num_kv_blocks=64)
    prompt = tiny_tokenizer().backend.encode("The quick brown fox").ids
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_hf_model("llama"), prompt, 12)


# --- broken files ---


def expect_error(path, *fragments):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    message = str(e.value)
    assert str(path) in message
    for f in fragments:
        assert f in message, message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(bytes(data))
    expect_error(path, "not a readable GGUF")


def test_not_a_gguf_at_all(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_error(path, "not a readable GGUF")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated(tmp_path, keep):
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(path)  # "truncated" or, cut inside the header, "not a readable GGUF"


def test_truncated_in_tensor_data_says_truncated(tmp_path):
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    expect_error(path, "truncated")


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, drop="model.layers.1.mlp.down_proj.weight")
    expect_error(path, "missing tensor", "model.layers.1.mlp.down_proj.weight")


def test_wrong_shape(tmp_path):
    path = tmp_path / "shape.gguf"
    write_tiny_gguf(path, quantized=None, reshape="model.layers.0.self_attn.v_proj.weight")
    expect_error(path, "model.layers.0.self_attn.v_proj.weight", "shape")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "arch.gguf"
    write_tiny_gguf(path, arch_name="mamba")
    expect_error(path, "unsupported architecture", "mamba")


def test_default_model_checksum_mismatch(tmp_path, monkeypatch):
    fake = tmp_path / "default.gguf"
    write_tiny_gguf(fake)
    monkeypatch.setattr(loader, "default_model_path", lambda: fake)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model("smollm2")
