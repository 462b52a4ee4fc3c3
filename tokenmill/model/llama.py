"""The Llama-family decoder over a paged KV cache. Llama, SmolLM2, Mistral, Qwen2 (q/k/v bias)
and Qwen3 (per-head q/k RMSNorm) differ only by ModelConfig flags."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model import cpu_decoder, weight_arena
from tokenmill.model.embedding_rows import QuantizedEmbedding
from tokenmill.model.attention import AttentionBackend, AttentionMetadata, TorchAttention
from tokenmill.model.layers import ConcatLinear, FloatLinear, RMSNorm, RotaryEmbedding, SwiGLU, apply_rope

log = logging.getLogger("tokenmill")

# (weight, bias) -> module computing x @ weight.T + bias; the loader passes a quantizing one.
LinearFactory = Callable[[object, "torch.Tensor | None"], nn.Module]


def stacked_linear(make_linear: LinearFactory, weights: list, biases: list) -> nn.Module:
    """One linear computing the given ones side by side (all biased or none), so q/k/v and
    gate/up run one kernel call each. Stacking output rows is exact for every weight format
    (scales are per row or per group within a row); GGUF tensors of mixed types stay apart."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        stacked = torch.cat(weights)
    elif isinstance(weights[0], torch.Tensor):
        stacked = None  # float tensors and GGUF blocks mixed
    else:  # GGUF blocks (gguf_blocks.QuantizedWeight; not imported here: it needs `gguf`)
        stacked = type(weights[0]).stacked(weights)
    if stacked is None:
        return ConcatLinear([make_linear(w, b) for w, b in zip(weights, biases)])
    return make_linear(stacked, None if biases[0] is None else torch.cat(biases))


def float_linear_factory(dtype: torch.dtype) -> LinearFactory:
    def make(weight, bias):
        return FloatLinear(weight.to(dtype), None if bias is None else bias.to(dtype))

    return make


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Callable[[str], object], make_linear: LinearFactory, dtype, backend: AttentionBackend):
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = stacked_linear(
            make_linear,
            [w(f"{p}_proj.weight") for p in "qkv"],
            [w(f"{p}_proj.bias", cfg.attention_bias) for p in "qkv"],
        )
        self.o_proj = make_linear(w("o_proj.weight"), None)
        self.q_norm = RMSNorm(w("q_norm.weight").to(dtype), cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w("k_norm.weight").to(dtype), cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor], attn_step):
        """attn_step: what self.backend.prepare made of this step's metadata."""
        t, h, kvh, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        if self.q_norm is None:
            # q and k side by side are one [T, h + kvh, d] tensor: one rotation for both.
            qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), *rope)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = apply_rope(self.q_norm(qkv[:, : h * d].view(t, h, d)), *rope)
            k = apply_rope(self.k_norm(qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)), *rope)
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k_cache, v_cache, k, v, attn_step)
        o = self.backend.forward(q, k_cache, v_cache, attn_step, self.scale)
        return self.o_proj(o.reshape(t, h * d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Callable[[str], object], make_linear: LinearFactory, dtype, backend: AttentionBackend):
        super().__init__()
        attn_w = lambda name, required=True: w(f"self_attn.{name}", required)  # noqa: E731
        self.self_attn = Attention(cfg, attn_w, make_linear, dtype, backend)
        self.mlp = SwiGLU(
            stacked_linear(make_linear, [w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")], [None, None]),
            make_linear(w("mlp.down_proj.weight"), None),
        )
        self.input_layernorm = RMSNorm(w("input_layernorm.weight").to(dtype), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w("post_attention_layernorm.weight").to(dtype), cfg.rms_norm_eps)

    def forward(self, h, rope, kv_cache, attn_step):
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, attn_step)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, object],
        dtype: torch.dtype = torch.float32,
        make_linear: LinearFactory | None = None,
        max_positions: int | None = None,
        # the LM head's, when it differs (fp8 keeps it float)
        make_head: LinearFactory | None = None,
        attention: AttentionBackend | None = None,  # chosen for the device (attention.choose_backend)
    ):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.attention = attention or TorchAttention()
        make_linear = make_linear or float_linear_factory(dtype)

        def getter(prefix: str):
            def w(name: str, required: bool = True):
                key = prefix + name
                if key not in weights:
                    if required:
                        raise KeyError(f"missing weight {key!r}")
                    return None
                return weights[key]

            return w

        embed = weights["model.embed_tokens.weight"]
        if isinstance(embed, torch.Tensor):
            self.embed_tokens = nn.Parameter(embed.to(dtype), requires_grad=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions or cfg.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, getter(f"model.layers.{i}."), make_linear, dtype, self.attention) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"].to(dtype), cfg.rms_norm_eps)
        head = weights.get("lm_head.weight")
        if head is None:
            if not cfg.tie_word_embeddings:
                raise KeyError("missing weight 'lm_head.weight' (and embeddings are not tied)")
            self.lm_head = FloatLinear(self.embed_tokens, None)  # shares storage, no copy
        else:
            self.lm_head = (make_head or make_linear)(head, None)
        if not isinstance(embed, torch.Tensor):  # GGUF blocks: rows are dequantized as they are looked up
            vocab, hidden = embed.shape
            # Tied, and the head holds the file's own int8 values (not requantized by
            # --quantization int8): the head's copy serves both.
            if head is embed and getattr(self.lm_head, "file_values", False):
                self.embed_tokens = QuantizedEmbedding(self.lm_head.dequantized_rows, vocab, hidden, dtype, "the LM head")
            else:
                self.embed_tokens = QuantizedEmbedding(embed.dequantized_rows, vocab, hidden, dtype, "the GGUF blocks")
        # The quantized kernels' weights on huge pages (CPU); before the decoder holds them.
        arena = weight_arena.gather(self)
        if arena is not None:
            huge = weight_arena.huge_page_bytes(arena)
            log.info("weights: %.1f MiB of quantized kernel buffers in one arena, %s on huge pages", arena.numel() / 2**20,
                     "unknown" if huge is None else f"{huge / 2**20:.1f} MiB")
        # Every layer in one C++ call per step where the weights and attention allow it (CPU,
        # quantized kernels); else the layers run op by op below.
        self.cpu_decoder = cpu_decoder.for_model(self)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        embed = self.embed_tokens
        h = embed(input_ids) if isinstance(embed, QuantizedEmbedding) else F.embedding(input_ids, embed)
        rope = self.rotary(positions)
        attn_step = self.attention.prepare(meta, kv_caches[0, 0])  # once, for every layer
        if self.cpu_decoder is not None:
            return self.norm(self.cpu_decoder.forward(h, rope, kv_caches, attn_step))
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, (kv_caches[0, i], kv_caches[1, i]), attn_step)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
