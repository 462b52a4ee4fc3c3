"""Helpers for tests on the real default model: the model built the way the engine builds it,
full-sequence logits (for perplexity), and the transformers reference loaded from the same GGUF."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.model.attention import AttentionMetadata, PrefillChunk, choose_backend
from tokenmill.model.attention.kv_dtype import row_width
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


@lru_cache(maxsize=4)
def model(quantization: str, cpu_kernel: bool = False) -> LlamaForCausalLM:
    """`cpu_kernel`: attention through the C++ kernel, as the engine's on CPU (it reads every KV
    pool dtype), else torch's."""
    lm = loaded(quantization)

    def factory(weight, bias, quantization=quantization):
        return make_linear(weight, bias, torch.float32, quantization, 32)

    # As the engine does: fp8 keeps the LM head in float.
    head_quantization = "none" if quantization == "fp8" else quantization
    head = lambda weight, bias: factory(weight, bias, head_quantization)  # noqa: E731
    attention = choose_backend(torch.device("cpu"), torch.float32) if cpu_kernel else None
    return LlamaForCausalLM(
        lm.config, lm.weights, torch.float32, factory, max_positions=2048, make_head=head, attention=attention)


def sequence_logits(m: LlamaForCausalLM, ids: list[int], block_size: int = 16, kv_dtype: torch.dtype | None = None,
                    pools: list | None = None) -> torch.Tensor:
    """Logits [T, vocab] of one sequence run as a single prefill chunk, over a KV pool of
    `kv_dtype` (default: the model's), appended to `pools` when given."""
    cfg = m.config
    t = len(ids)
    blocks = -(-t // block_size)
    kv_dtype = m.dtype if kv_dtype is None else kv_dtype
    kv = torch.zeros(2, cfg.num_layers, blocks, cfg.num_kv_heads, block_size, row_width(cfg.head_dim, kv_dtype), dtype=kv_dtype)
    if pools is not None:
        pools.append(kv)
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


@lru_cache(maxsize=2)
def kv_logits(kv_dtype: torch.dtype) -> torch.Tensor:
    """text()'s logits on the default model (dequantized) over a `kv_dtype` pool, C++ attention."""
    ids = loaded("none").tokenizer.encode(text())
    return sequence_logits(model("none", cpu_kernel=True), ids, kv_dtype=kv_dtype)


def perplexity_vs_float_kv(kv_dtype: torch.dtype) -> tuple[float, float, float, int]:
    """(perplexity over a float32 KV pool, over a `kv_dtype` pool, next-token argmax agreement,
    tokens) on text(): the default model, its weights dequantized to float32 (so only the pool
    differs, and a whole-text prefill runs at float matmul speed), attention in the C++ kernel."""
    ids = loaded("none").tokenizer.encode(text())
    logits_f = kv_logits(torch.float32)
    logits_q = kv_logits(kv_dtype)
    agree = (logits_f.argmax(-1) == logits_q.argmax(-1)).float().mean().item()
    return perplexity(logits_f, ids), perplexity(logits_q, ids), agree, len(ids)


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
