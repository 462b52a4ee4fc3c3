"""The Llama-family decoder over a paged KV cache. Llama, SmolLM2, Mistral, Qwen2 (q/k/v bias)
and Qwen3 (per-head q/k RMSNorm) differ only by ModelConfig flags."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata, paged_attention, write_kv
from tokenmill.model.layers import FloatLinear, RMSNorm, RotaryEmbedding, SwiGLU

# (weight, bias) -> module computing x @ weight.T + bias; the loader passes a quantizing one.
LinearFactory = Callable[[object, "torch.Tensor | None"], nn.Module]


def float_linear_factory(dtype: torch.dtype) -> LinearFactory:
    def make(weight, bias):
        return FloatLinear(weight.to(dtype), None if bias is None else bias.to(dtype))

    return make


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Callable[[str], object], make_linear: LinearFactory, rope, dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = make_linear(w("q_proj.weight"), w("q_proj.bias", cfg.attention_bias))
        self.k_proj = make_linear(w("k_proj.weight"), w("k_proj.bias", cfg.attention_bias))
        self.v_proj = make_linear(w("v_proj.weight"), w("v_proj.bias", cfg.attention_bias))
        self.o_proj = make_linear(w("o_proj.weight"), None)
        self.q_norm = RMSNorm(w("q_norm.weight").to(dtype), cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w("k_norm.weight").to(dtype), cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.scale = self.head_dim**-0.5

    def forward(self, x, positions, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, w: Callable[[str], object], make_linear: LinearFactory, rope, dtype):
        super().__init__()
        attn_w = lambda name, required=True: w(f"self_attn.{name}", required)  # noqa: E731
        self.self_attn = Attention(cfg, attn_w, make_linear, rope, dtype)
        self.mlp = SwiGLU(
            make_linear(w("mlp.gate_proj.weight"), None),
            make_linear(w("mlp.up_proj.weight"), None),
            make_linear(w("mlp.down_proj.weight"), None),
        )
        self.input_layernorm = RMSNorm(w("input_layernorm.weight").to(dtype), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w("post_attention_layernorm.weight").to(dtype), cfg.rms_norm_eps)

    def forward(self, h, positions, kv_cache, meta):
        h = h + self.self_attn(self.input_layernorm(h), positions, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, object],
        dtype: torch.dtype = torch.float32,
        make_linear: LinearFactory | None = None,
        max_positions: int | None = None,
        make_head: LinearFactory | None = None,  # the LM head's, when it differs (fp8 keeps it float)
    ):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
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
        self.embed_tokens = nn.Parameter(embed.to(dtype), requires_grad=False)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions or cfg.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, getter(f"model.layers.{i}."), make_linear, rope, dtype) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"].to(dtype), cfg.rms_norm_eps)
        head = weights.get("lm_head.weight")
        if head is None:
            if not cfg.tie_word_embeddings:
                raise KeyError("missing weight 'lm_head.weight' (and embeddings are not tied)")
            self.lm_head = FloatLinear(self.embed_tokens, None)  # shares storage, no copy
        else:
            self.lm_head = (make_head or make_linear)(head, None)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed_tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, (kv_caches[0, i], kv_caches[1, i]), meta)
        return self.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
