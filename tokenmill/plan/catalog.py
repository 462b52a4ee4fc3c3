"""Hardware and model shapes: catalog.json (each hardware figure with its source and date),
or a user's own catalog file, or an HF config.json for a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import ModelConfig

CATALOG_PATH = Path(__file__).with_name("catalog.json")

# Bytes per weight of each format. int4 is group-32 with an fp16 scale (0.5 + 2/32); q4_1 is
# GGUF's 32 weights in 16 bytes plus an fp16 scale and an fp16 min (20 bytes / 32).
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "int8": 1.0625, "int4": 0.5625, "q4_1": 0.625}


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float
    fp8_tflops: float | None  # None: no 8-bit tensor units (A100), fp8 weights run at bf16 rate
    memory_gb: float
    bandwidth_gbs: float
    link_gbs: float
    on_demand_per_hour: float
    spot_per_hour: float
    source: dict

    def peak_flops(self, weight_format: str) -> float:
        """FLOP/s of the matmuls a format runs: 8-bit formats on 8-bit units where there are any."""
        if weight_format in ("fp8", "int8") and self.fp8_tflops:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9

    def price_per_hour(self, spot: bool = False) -> float:
        return self.spot_per_hour if spot else self.on_demand_per_hour


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder: enough to count its parameters, FLOPs and KV."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1  # MoE: experts per layer, of which experts_per_token run per token
    experts_per_token: int = 1

    @classmethod
    def from_model_config(cls, name: str, cfg: ModelConfig) -> "ModelShape":
        return cls(name, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelShape":
        raw = json.loads(Path(path).read_text())
        # ModelConfig.from_hf refuses MoE model types; read the dense fields ourselves then.
        cfg = ModelConfig.from_hf({**raw, "model_type": "llama"})
        experts = raw.get("num_local_experts") or raw.get("num_experts") or 1
        top_k = raw.get("num_experts_per_tok") or 1
        inter = raw.get("moe_intermediate_size") or cfg.intermediate_size if experts > 1 else cfg.intermediate_size
        return cls(Path(path).parent.name or "model", cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, inter, cfg.vocab_size, cfg.tie_word_embeddings, experts, top_k)

    # -- parameters ----------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o; k, v

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's matmul (the embedding's transpose when tied: same FLOPs, no extra bytes)."""
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return self.attention_params + self.num_experts * self.expert_params + router

    @property
    def params_total(self) -> int:
        head = 0 if self.tie_word_embeddings else self.head_params
        return self.num_layers * self.layer_params + self.embedding_params + head

    @property
    def body_params_active(self) -> int:
        """Parameters one token multiplies through the layers (MoE: its top-k experts only)."""
        return self.num_layers * (self.attention_params + self.experts_per_token * self.expert_params)

    @property
    def params_active(self) -> int:
        return self.body_params_active + self.head_params

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes


def _load(path: str | Path | None) -> dict:
    return json.loads(Path(path or CATALOG_PATH).read_text())


def hardware(name: str, catalog: str | Path | None = None) -> Hardware:
    table = _load(catalog)["hardware"]
    if name not in table:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(table)}")
    return Hardware(name=name, **table[name])


def hardware_names(catalog: str | Path | None = None) -> list[str]:
    return list(_load(catalog)["hardware"])


def model_shape(name: str, catalog: str | Path | None = None) -> ModelShape:
    """A catalog name, or a path to an HF config.json (or a directory holding one)."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.exists():
        return ModelShape.from_hf_config(path)
    table = _load(catalog)["models"]
    key = name.lower()
    if key not in table:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(table)} (or a path to an HF config.json)")
    fields = {k: v for k, v in table[key].items() if k != "source"}
    return ModelShape(name=key, **fields)
