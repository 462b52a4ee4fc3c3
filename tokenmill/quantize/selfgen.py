"""Calibration text sampled from the model itself (as in LLM-QAT, Liu et al., 2023): GPTQ needs
far more calibration tokens than the shipped text holds (its Hessian over a 1,536-wide input is
singular below 1,536 tokens and overfits well above that; the papers use ~250,000), and text the
model itself finds likely covers what it will be asked to continue, with no corpus to ship.

Sequences start from the end-of-text token (a document boundary, as in pre-training) and are
sampled at temperature 1 from the full distribution, so each one wanders to its own topic; they
are decoded together as one batch over a small paged KV pool, with the decoder's own layers."""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.tokenizer import Tokenizer

BLOCK = 16


def start_token(tokenizer: Tokenizer) -> int:
    """A document boundary: BOS where the model is trained with one, else the end-of-text token."""
    if tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_ids:
        return tokenizer.eos_token_ids[0]
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")


@torch.inference_mode()
def sample_sequences(cfg: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer, num_tokens: int,
                     seq_len: int = 256, batch: int = 32, seed: int = 0, temperature: float = 1.0) -> list[list[int]]:
    """About num_tokens sampled tokens, as sequences of seq_len (each begins with the start
    token), generated `batch` at a time from the float weights (temperature 0: greedy)."""
    model = LlamaForCausalLM(cfg, weights, torch.float32, max_positions=seq_len)
    gen = torch.Generator().manual_seed(seed)
    first = start_token(tokenizer)
    out: list[list[int]] = []
    remaining = num_tokens
    while remaining > 0:
        n = min(batch, -(-remaining // (seq_len - 1)))
        out += _sample_batch(model, cfg, first, n, seq_len, gen, temperature)
        remaining -= n * (seq_len - 1)
    return out


def _sample_batch(model: LlamaForCausalLM, cfg: ModelConfig, first: int, n: int, seq_len: int,
                  gen: torch.Generator, temperature: float) -> list[list[int]]:
    blocks = -(-seq_len // BLOCK)
    kv = torch.zeros(2, cfg.num_layers, n * blocks, cfg.num_kv_heads, BLOCK, cfg.head_dim)
    tables = torch.arange(n * blocks).view(n, blocks)  # sequence b owns blocks [b*blocks, (b+1)*blocks)
    seqs = torch.full((n, seq_len), first, dtype=torch.long)
    for pos in range(seq_len - 1):
        # every sequence decodes its token at `pos` (position 0's start token is a one-key decode)
        slots = tables[:, pos // BLOCK] * BLOCK + pos % BLOCK
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=n, decode_block_tables=tables,
                                 decode_context_lens=torch.full((n,), pos + 1), prefills=[])
        hidden = model(seqs[:, pos], torch.full((n,), pos), kv, meta)
        logits = model.compute_logits(hidden)
        if temperature == 0:
            seqs[:, pos + 1] = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            seqs[:, pos + 1] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return seqs.tolist()

