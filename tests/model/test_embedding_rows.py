"""A quantized embedding table looked up where its values already are (embedding_rows.py): the
rows equal the dequantized table's bit for bit, from the GGUF blocks and from a tied int8 LM
head's kernel layout; a bad id is a clear error; and the default model on CPU holds no copy of
its table beside the head's, yet looks up the rows it did with a float table (so every forward
is unchanged: the greedy and perplexity tests of the default model run through this lookup)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from tests.model import real
from tests.model.gguf_files import write_tiny_gguf
from tokenmill.config import EngineConfig
from tokenmill.model import qkernels
from tokenmill.model.embedding_rows import QuantizedEmbedding
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import float_embedding, load_model
from tokenmill.model.quant import Int8Linear, make_linear


def table(qtype: Q, vocab: int = 37, hidden: int = 96) -> QuantizedWeight:
    w = np.random.default_rng(vocab).standard_normal((vocab, hidden)).astype(np.float32)
    return QuantizedWeight(quantize(w, qtype), qtype, (vocab, hidden))


IDS = torch.tensor([0, 5, 8, 36, 36, 13])  # 37 rows: the last column group is padded


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q4_0])
def test_rows_from_the_blocks_are_the_tables_rows(qtype):
    t = table(qtype)
    assert torch.equal(t.dequantized_rows(IDS), t.dequantize()[IDS])


def test_rows_from_a_tied_int8_head_are_the_tables_rows():
    t = table(Q.Q8_0)
    head = Int8Linear.from_gguf(t, None, torch.float32)
    assert torch.equal(head.dequantized_rows(IDS), t.dequantize()[IDS])


@pytest.mark.parametrize("kind", ["Q8_0 head", "per-row int8, 100 inputs"])
def test_the_kernels_row_lookup_gives_the_torch_paths_bits(kind, monkeypatch):
    # One C++ call (qkernels.int8_rows) where torch took a dozen small ops a step; torch's stays
    # as the fallback. 100 inputs: a padded last quad group and one scale per row.
    if kind == "Q8_0 head":
        head = Int8Linear.from_gguf(table(Q.Q8_0), None, torch.float32)
    else:
        head = Int8Linear.from_float(torch.randn(37, 100, generator=torch.Generator().manual_seed(1)), None, torch.float32)
    assert qkernels.kernel() is not None
    fast = head.dequantized_rows(IDS)
    with pytest.raises(IndexError, match="out of range for a table of 37 rows"):
        head.dequantized_rows(torch.tensor([3, 37]))
    monkeypatch.setattr(qkernels, "kernel", lambda: None)
    assert torch.equal(fast, head.dequantized_rows(IDS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_shapes_dtypes_and_bad_ids(dtype):
    t = table(Q.Q8_0)
    emb = QuantizedEmbedding(t.dequantized_rows, 37, 96, dtype, "the GGUF blocks")
    ids = IDS.view(2, 3)
    got = emb(ids)
    assert got.shape == (2, 3, 96) and got.dtype == dtype
    assert torch.equal(got, t.dequantize().to(dtype)[ids])
    assert emb(torch.tensor([], dtype=torch.long)).shape == (0, 96)
    for bad in (37, -1):
        with pytest.raises(IndexError, match="table of 37 rows"):
            emb(torch.tensor([1, bad]))


@pytest.mark.parametrize("quantization, source", [("auto", "the LM head"), ("int8", "the GGUF blocks"),
                                                  ("int4", "the GGUF blocks")])
def test_the_head_serves_the_lookup_only_with_the_files_own_values(tmp_path, quantization, source):
    """--quantization int8 requantizes the head per row: its values are no longer the table's."""
    write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", Q.Q8_0)  # tied embeddings
    lm = load_model(str(tmp_path / "tiny.gguf"), EngineConfig.from_flat(quantization=quantization))
    factory = lambda weight, bias: make_linear(weight, bias, torch.float32, quantization, 32)  # noqa: E731
    model = LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=64)
    assert model.embed_tokens.source == source
    ids = torch.arange(lm.config.vocab_size)
    assert torch.equal(model.embed_tokens(ids), lm.weights["model.embed_tokens.weight"].dequantize())


def test_float_weights_still_get_a_float_table(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", Q.Q8_0)
    m = load_model(str(tmp_path / "tiny.gguf"), EngineConfig.from_flat(quantization="none"))
    assert isinstance(m.weights["model.embed_tokens.weight"], torch.Tensor)  # the tied float head shares it
    q = load_model(str(tmp_path / "tiny.gguf"), EngineConfig.from_flat(quantization="auto")).weights
    assert isinstance(float_embedding(q)["model.embed_tokens.weight"], torch.Tensor)
    assert isinstance(q["model.embed_tokens.weight"], QuantizedWeight)  # a copy: the loaded dict is left alone


@torch.inference_mode()
def test_default_model_holds_one_table_and_looks_up_the_same_rows():
    lm = real.loaded("auto")
    factory = lambda weight, bias: make_linear(weight, bias, torch.float32, "auto", 32)  # noqa: E731
    rows = LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=256)
    floats = LlamaForCausalLM(lm.config, float_embedding(lm.weights), torch.float32, factory, max_positions=256)
    assert isinstance(rows.embed_tokens, QuantizedEmbedding) and rows.embed_tokens.source == "the LM head"
    assert isinstance(rows.lm_head, Int8Linear)
    table = lm.config.vocab_size * lm.config.hidden_size
    assert not any(t.numel() >= table and t.is_floating_point() for t in [*rows.parameters(), *rows.buffers()])
    assert any(p.numel() == table for p in floats.parameters())  # what the lookup replaces
    ids = torch.tensor(lm.tokenizer.encode(real.PROMPTS[0]) + [0, lm.config.vocab_size - 1])
    assert torch.equal(rows.embed_tokens(ids), floats.embed_tokens[ids])
