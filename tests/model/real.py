"""Helpers for tests on the real default model: the model built the way the engine builds it,
full-sequence logits (for perplexity), and the transformers reference loaded from the same GGUF."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.model.attention import AttentionMetadata, PrefillChunk
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import LoadedModel, default_model_path, load_model
from tokenmill.model.quant import make_linear

DATA = Path(__file__).parent / "data"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@lru_cache(maxsize=3)
def loaded(quantization: str) -> LoadedModel:
    return load_model("smollm2", EngineConfig.from_flat(quantization=quantization))


@lru_cache(maxsize=3)
def model(quantization: str) -> LlamaForCausalLM:
    lm = loaded(quantization)

    def factory(weight, bias, quantization=quantization):
        return make_linear(weight, bias, torch.float32, quantization, 32)

    # As the engine does: fp8 keeps the LM head in float.
    head_quantization = "none" if quantization == "fp8" else quantization
    head = lambda weight, bias: factory(weight, bias, head_quantization)  # noqa: E731
    return LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=2048, make_head=head)


def sequence_logits(m: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [T, vocab] of one sequence run as a single prefill chunk."""
    cfg = m.config
    t = len(ids)
    blocks = -(-t // block_size)
    kv = torch.zeros(2, cfg.num_layers, blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=m.dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t),
        num_decodes=0,
        decode_block_tables=None,
        decode_context_lens=None,
        prefills=[PrefillChunk(0, t, t, torch.arange(blocks))],
    )
    hidden = m(torch.tensor(ids), torch.arange(t), kv, meta)
    return m.compute_logits(hidden)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    return math.exp(nll)


def text() -> str:
    return (DATA / "perplexity.txt").read_text(encoding="utf-8")


def gguf_dir(tmp: Path) -> tuple[str, str]:
    """transformers wants (directory, file name): link the packaged GGUF into a temp dir."""
    link = tmp / "model.gguf"
    if not link.exists():
        os.symlink(default_model_path(), link)
    return str(tmp), link.name


@lru_cache(maxsize=1)
def hf_reference(directory: str, name: str):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return m.eval()


def perplexity_vs_float(quantization: str) -> tuple[float, float, float, int]:
    """(float32 perplexity, `quantization`'s, next-token argmax agreement, tokens) on text()."""
    ids = loaded("none").tokenizer.encode(text())
    logits_f = sequence_logits(model("none"), ids)
    logits_q = sequence_logits(model(quantization), ids)
    agree = (logits_f.argmax(-1) == logits_q.argmax(-1)).float().mean().item()
    return perplexity(logits_f, ids), perplexity(logits_q, ids), agree, len(ids)
