"""Calibration data and the block-by-block forward that feeds the quantizers: each decoder layer
runs on its own over the calibration sequences, with hooks recording what enters its linears,
so memory holds one layer's activations (its inputs, its outputs, its linears' inputs) at a
time, never the whole model's."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata, PrefillChunk, TorchAttention
from tokenmill.model.layers import RotaryEmbedding
from tokenmill.model.llama import DecoderLayer, float_linear_factory
from tokenmill.model.loader import float_embedding
from tokenmill.model.tokenizer import Tokenizer

BLOCK = 16  # KV block size of the per-sequence scratch cache
# The linears of a decoder layer that see distinct inputs, by their module path in DecoderLayer
# (q/k/v share one input, as do gate/up: the decoder stacks them into one linear).
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up", "mlp.down")


def default_calibration_text() -> str:
    """The calibration text shipped with the package (original prose on mixed topics, written for
    it; kept apart from every evaluation text the tests and benchmarks use)."""
    return files("tokenmill.quantize").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_sequences(tokenizer: Tokenizer, text: str | Path | None, seq_len: int = 512,
                          max_tokens: int | None = None) -> list[list[int]]:
    """The text (a path, the text itself, or None for the shipped one) cut into sequences of at
    most seq_len tokens, each starting with BOS when the tokenizer adds one."""
    if text is None:
        text = default_calibration_text()
    elif isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 16:
        raise ValueError(f"calibration text too short: {len(ids)} tokens")
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    return [bos + ids[i : i + step] for i in range(0, len(ids), step) if len(ids[i : i + step]) >= 8]


@dataclass
class LayerInputs:
    """What entered each linear of one layer, concatenated over the calibration sequences."""

    rows: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {name: [] for name in LINEARS})

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])


class BlockRunner:
    """Runs one decoder layer at a time, exactly as the decoder does (its own modules), over a
    fixed set of sequences."""

    def __init__(self, cfg: ModelConfig, sequences: list[list[int]]):
        self.cfg = cfg
        self.sequences = sequences
        self.attention = TorchAttention()
        longest = max(len(s) for s in sequences)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max(longest, 16))
        self.rope = [rotary(torch.arange(len(s))) for s in sequences]

    def embed(self, weights: dict) -> list[torch.Tensor]:
        table = float_embedding(weights)["model.embed_tokens.weight"].float()
        return [table[torch.tensor(s)] for s in self.sequences]

    def layer(self, weights: dict, i: int) -> DecoderLayer:
        prefix = f"model.layers.{i}."

        def w(name: str, required: bool = True):
            if prefix + name not in weights and not required:
                return None
            return weights[prefix + name]

        return DecoderLayer(self.cfg, w, float_linear_factory(torch.float32), torch.float32, self.attention)

    @torch.inference_mode()
    def run(self, layer: DecoderLayer, hidden: list[torch.Tensor], capture: bool = False) -> tuple[list[torch.Tensor], LayerInputs]:
        """The layer's outputs for every sequence, and (capture=True) its linears' inputs."""
        inputs = LayerInputs()
        hooks = []
        if capture:
            for name in LINEARS:
                module = layer.get_submodule(name)
                hooks.append(module.register_forward_pre_hook(lambda _m, args, name=name: inputs.rows[name].append(args[0].clone())))
        try:
            outs = [self._one(layer, h, rope) for h, rope in zip(hidden, self.rope)]
        finally:
            for hook in hooks:
                hook.remove()
        return outs, inputs

    def _one(self, layer: DecoderLayer, h: torch.Tensor, rope) -> torch.Tensor:
        t, cfg = h.shape[0], self.cfg
        blocks = -(-t // BLOCK)
        kv = torch.zeros(2, blocks, cfg.num_kv_heads, BLOCK, cfg.head_dim)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t), num_decodes=0, decode_block_tables=None, decode_context_lens=None,
            prefills=[PrefillChunk(0, t, t, torch.arange(blocks))],
        )
        step = self.attention.prepare(meta, kv[0])
        return layer(h, (rope[0][:t], rope[1][:t]), (kv[0], kv[1]), step)
