"""EngineConfig: the one place where engine settings live and are validated."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bfloat16 on CUDA
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when torch sees a GPU
QUANTIZATIONS = ("auto", "none", "int8", "int4", "fp8")
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class EngineConfig:
    model: str = "smollm2"
    # KV cache
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    num_kv_blocks: int | None = None  # overrides the memory budget (tests force tiny pools)
    enable_prefix_caching: bool = True
    # scheduling
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's own context length
    max_waiting_requests: int = 1024
    # model
    dtype: str = "auto"
    device: str = "auto"
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory for weights + activations + KV
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    quantization: str = "auto"  # auto: keep a GGUF's quantized weights quantized
    quant_group_size: int = 32
    # CPU: int4/int8 linears also keep bfloat16 copies of their weights for prompt rows and
    # the LM head, where torch's quantized kernels are 1.5-10x slower, as long as the copies of
    # the whole model fit in this many GB (per model: a draft model has its own); 0: never.
    dense_weight_limit_gb: float = 4.0
    seed: int = 0
    num_threads: int | None = None
    debug_checks: bool = False  # assert pool invariants after every step
    # speculative decoding
    speculative_method: str | None = None  # "ngram" (prompt lookup) | "draft" (a smaller model)
    num_speculative_tokens: int = 4  # k: the most drafts one request verifies per step
    draft_model: str | None = None  # path or name, for speculative_method="draft"
    prompt_lookup_min: int = 2  # n-gram sizes the prompt-lookup proposer tries, longest first
    prompt_lookup_max: int = 4
    # With more requests running than this, a step is compute-bound enough that verifying
    # drafts costs more than it saves: speculation pauses (benchmarks/spec_decode.py).
    speculative_disable_by_batch_size: int = 8

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting_requests", self.max_waiting_requests)
        _positive("quant_group_size", self.quant_group_size)
        if not self.dense_weight_limit_gb >= 0:
            raise ValueError(f"dense_weight_limit_gb must be >= 0, got {self.dense_weight_limit_gb}")
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if self.speculative_method is not None:
            if self.speculative_method not in SPECULATIVE_METHODS:
                raise ValueError(
                    f"speculative_method must be one of {SPECULATIVE_METHODS}, got {self.speculative_method!r}"
                )
            _positive("num_speculative_tokens", self.num_speculative_tokens)
            _positive("prompt_lookup_min", self.prompt_lookup_min)
            _positive("speculative_disable_by_batch_size", self.speculative_disable_by_batch_size)
            if self.prompt_lookup_max < self.prompt_lookup_min:
                raise ValueError("prompt_lookup_max must be >= prompt_lookup_min")

    @property
    def num_lookahead_tokens(self) -> int:
        """Draft tokens a request may verify per step (0: speculation off)."""
        return self.num_speculative_tokens if self.speculative_method else 0


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder; Qwen2/Qwen3/Mistral differ only by flags."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        model_type = cfg.get("model_type", "llama")
        supported = ("llama", "mistral", "qwen2", "qwen3")
        if model_type not in supported:
            raise ValueError(f"unsupported architecture {model_type!r} ({arch}); supported: {supported}")
        num_heads = cfg["num_attention_heads"]
        # transformers >= 5 folds theta and scaling into "rope_parameters"
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=model_type,
        )

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the decoder needs, with its HF-layout shape ([out, in] for linears)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
            }
            if self.attention_bias:
                shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
            if self.qk_norm:
                shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        return shapes
