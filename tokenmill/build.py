"""Build an Engine from an EngineConfig: load the model, size the KV pool, wire the runner.

The one place where torch, the device, the model and the engine meet; it sits above both
tokenmill.engine (which never imports the model) and tokenmill.model (which never imports the
engine)."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig, LoadConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine import Engine
from tokenmill.model.attention import choose_backend
from tokenmill.model.attention.kv_dtype import TORCH_KV_DTYPES
from tokenmill.model.fp8 import Fp8Weight
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model import qkernels
from tokenmill.model.quant import WeightOnlyLinear, make_linear
from tokenmill.model.runner import ModelRunner, kv_block_bytes
from tokenmill.startup import phase
from tokenmill.step import ScheduledSeq

log = logging.getLogger("tokenmill")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# kv_cache_dtype="auto" on a CPU: half the bytes of float32 for every token attention reads and
# twice the tokens in the pool. bfloat16 over float16: measured in docs/benchmarks.md (KV cache dtypes).
CPU_KV_DTYPE = torch.bfloat16


def build_engine(config: EngineConfig, loaded=None, draft_loaded=None) -> Engine:
    """`loaded` is anything with .config (ModelConfig), .weights (HF-named) and .tokenizer;
    by default config.load.model is loaded with tokenmill.model.loader (and config.speculative.draft_model,
    or `draft_loaded`, is the draft for speculative_method="draft")."""
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    if loaded is None:
        from tokenmill.model.loader import load_model

        loaded = load_model(config.load.model, config)
    cfg = loaded.config
    device = resolve_device(config.runtime.device)
    dtype = resolve_dtype(config.load.dtype, device)
    max_model_len = min(config.scheduler.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    kv_dtype = resolve_kv_dtype(config.cache.kv_cache_dtype, device, dtype)
    attention = choose_backend(device, dtype, kv_dtype)
    with phase("model built (weights packed for the kernels)"):
        model = _build_model(config, loaded, dtype, device, max_model_len, attention)
    if device.type == "cpu" and any(isinstance(m, WeightOnlyLinear) for m in model.modules()):
        qkernels.kernel()  # imported (or built) now, so a healthy server never compiles on a request
    # A draft model's KV pool mirrors the target's blocks: both are paid from one budget.
    draft = _build_draft(config, loaded, draft_loaded, dtype, device, max_model_len, attention)
    block_bytes = kv_block_bytes(cfg, config.cache.block_size, kv_dtype)
    if draft is not None:
        block_bytes += kv_block_bytes(draft.config, config.cache.block_size, kv_dtype)
    if config.cache.num_kv_blocks:
        num_blocks = config.cache.num_kv_blocks
    elif device.type == "cuda":
        num_blocks = _cuda_num_blocks(model, config, block_bytes, max_model_len, kv_dtype)
    else:
        num_blocks = max(1, config.cache.kv_cache_memory_bytes // block_bytes)
    log.info(
        "KV cache on %s in %s: %d blocks x %d tokens = %d tokens (%.1f MiB%s)", device, kv_dtype,
        num_blocks, config.cache.block_size, num_blocks * config.cache.block_size, num_blocks * block_bytes / 2**20,
        ", the draft's included" if draft is not None else "",
    )
    with phase("KV cache allocated"):
        runner = ModelRunner(model, num_blocks, config.cache.block_size, config.runtime.seed, kv_dtype)
    if device.type == "cuda" and not config.runtime.enforce_eager:
        if attention.graph_capturable:
            from tokenmill.model.cuda_graphs import DecodeGraphs

            max_blocks = -(-max_model_len // config.cache.block_size)
            runner.decode_graphs = DecodeGraphs(runner, config.scheduler.max_num_seqs, max_blocks)
        else:
            log.warning("CUDA graphs need Triton's attention kernels (no triton?): running eagerly")
    proposer = None
    if config.speculative.speculative_method == "ngram":
        from tokenmill.spec.ngram import NgramProposer

        proposer = NgramProposer(config.speculative.prompt_lookup_min, config.speculative.prompt_lookup_max)
    elif draft is not None:
        from tokenmill.spec.draft import DraftModelProposer

        draft_runner = ModelRunner(draft, num_blocks, config.cache.block_size, config.runtime.seed, kv_dtype)
        proposer = DraftModelProposer(draft_runner, min(cfg.vocab_size, draft.config.vocab_size))
    return Engine(config, runner, loaded.tokenizer, max_model_len, num_blocks, cfg.vocab_size, proposer)


def build_async_engine(config: EngineConfig, loaded=None) -> AsyncEngine:
    """The engine behind its asyncio API (not started: the first request or start() does)."""
    return AsyncEngine(build_engine(config, loaded))


def _build_model(config: EngineConfig, loaded, dtype, device, max_model_len: int, attention) -> LlamaForCausalLM:
    if config.load.dense_weight_limit_gb != LoadConfig.dense_weight_limit_gb:
        log.warning("dense_weight_limit_gb is deprecated and has no effect: int4/int8 linears keep no dense copies")
    from tokenmill.model.loader import float_embedding

    # A quantized embedding table is looked up on the host; an accelerator gets a float one.
    weights = loaded.weights if device.type == "cpu" else float_embedding(loaded.weights)
    model = LlamaForCausalLM(
        loaded.config, weights, dtype, _linear_factory(config, dtype, device), max_model_len,
        make_head=_linear_factory(config, dtype, device, head=True), attention=attention,
    )
    return model.to(device)  # moves what was built on the host; weights made on the device stay put


def _build_draft(config: EngineConfig, loaded, draft_loaded, dtype, device, max_model_len: int, attention):
    if config.speculative.speculative_method != "draft":
        return None
    if draft_loaded is None:
        if not config.speculative.draft_model:
            raise ValueError("speculative_method='draft' needs a draft_model")
        from tokenmill.model.loader import load_model

        draft_loaded = load_model(config.speculative.draft_model, config)
    check_same_tokenizer(loaded.tokenizer, draft_loaded.tokenizer)
    draft = _build_model(config, draft_loaded, dtype, device, max_model_len, attention)
    log.info("draft model: %d layers, %d hidden", draft.config.num_layers, draft.config.hidden_size)
    return draft


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def resolve_kv_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype: for "auto" a 16-bit pool on a CPU (whose float32 model would
    otherwise spend 4 bytes a value), the model's dtype on CUDA (already 16-bit by default)."""
    if name == "auto":
        return CPU_KV_DTYPE if device.type == "cpu" else dtype
    return TORCH_KV_DTYPES[name]


def profile_segments(num_tokens: int, max_model_len: int, block_size: int) -> tuple[list[ScheduledSeq], int]:
    """The largest step as prefill segments no longer than the context (RoPE has no positions
    past it), each on its own blocks; and the number of blocks they use."""
    per_seq = min(num_tokens, max_model_len)
    blocks_per_seq = -(-per_seq // block_size)
    segments = []
    for i, start in enumerate(range(0, num_tokens, per_seq)):
        n = min(per_seq, num_tokens - start)
        segments.append(ScheduledSeq(list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), 0, [0] * n))
    return segments, len(segments) * blocks_per_seq


@torch.inference_mode()
def profile_forward(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int, kv_dtype=None) -> int:
    """Run the largest step once on a throwaway pool; returns the pool's bytes."""
    segments, num_blocks = profile_segments(config.scheduler.max_num_batched_tokens, max_model_len, config.cache.block_size)
    probe = ModelRunner(model, num_blocks, config.cache.block_size, kv_dtype=kv_dtype)
    hidden = probe.forward(segments)
    model.compute_logits(hidden[: min(len(hidden), config.scheduler.max_num_seqs)])
    return probe.kv_caches.numel() * probe.kv_caches.element_size()


def _cuda_num_blocks(model: LlamaForCausalLM, config: EngineConfig, block_bytes: int, max_model_len: int, kv_dtype) -> int:
    """Blocks that fit in gpu_memory_utilization of the GPU after the weights and the activation
    peak of the largest step (a profiling forward of max_num_batched_tokens tokens)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    probe_bytes = profile_forward(model, config, max_model_len, kv_dtype)
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - before - probe_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = int(total * config.cache.gpu_memory_utilization) - (total - free) - activations
    log.info(
        "GPU memory: %.1f GiB total, %.1f GiB in use (weights, other processes), activation peak %.2f GiB, "
        "KV budget %.1f GiB at utilization %.2f",
        total / 2**30, (total - free) / 2**30, activations / 2**30, budget / 2**30, config.cache.gpu_memory_utilization,
    )
    if budget < block_bytes:
        raise ValueError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={config.cache.gpu_memory_utilization} "
            f"(weights and activations take {(total - free + activations) / 2**30:.1f} GiB of {total / 2**30:.1f})"
        )
    return budget // block_bytes


def check_same_tokenizer(target, draft) -> None:
    """Draft token ids are fed to the target as they are: the two vocabularies must agree."""
    if draft is None or target is None:
        raise ValueError("speculative decoding with a draft model needs both models' tokenizers")
    t, d = target.backend.get_vocab(with_added_tokens=True), draft.backend.get_vocab(with_added_tokens=True)
    if t != d:
        diff = sorted(set(t.items()) ^ set(d.items()))[:3]
        raise ValueError(
            f"the draft model's tokenizer differs from the target's ({len(d)} vs {len(t)} tokens; "
            f"first differences: {diff}): a draft model must share the target's tokenizer"
        )
    if list(target.eos_token_ids) != list(draft.eos_token_ids):
        raise ValueError("the draft model's EOS tokens differ from the target's")


def _linear_factory(config: EngineConfig, dtype: torch.dtype, device: torch.device, head: bool = False):
    quantization = config.load.quantization
    if device.type == "cuda" and quantization != "fp8":
        quantization = "none"  # the int4/int8 kernels are CPU ones: GGUF weights run dequantized
    if head and quantization == "fp8":
        quantization = "none"  # fp8 logits cost 2% perplexity on SmolLM2 for a small saving (docs/benchmarks.md)
    def make(weight, bias):
        # An FP8 checkpoint's own e4m3 weights run fp8 under auto on every device (as vLLM runs them).
        q = "auto" if isinstance(weight, Fp8Weight) and config.load.quantization == "auto" else quantization
        return make_linear(weight, bias, dtype, q, config.load.quant_group_size)

    return make


def build_async_embedder(model: str, max_batch_tokens: int | None = None, max_batch_inputs: int | None = None,
                         num_threads: int | None = None, dtype: str = "auto"):
    """An embedding model (`minilm` or a sentence-transformers directory) behind AsyncEmbedder;
    `dtype` its linears' (bert.DTYPES)."""
    from tokenmill.engine.async_embedder import AsyncEmbedder, EmbedLimits
    from tokenmill.model.bert import special_ids
    from tokenmill.model.loader import load_encoder

    if num_threads:
        torch.set_num_threads(num_threads)
    loaded = load_encoder(model, dtype)
    limits = {k: v for k, v in (("max_batch_tokens", max_batch_tokens), ("max_batch_inputs", max_batch_inputs))
              if v is not None}
    embedder = AsyncEmbedder(loaded.model, loaded.tokenizer,
                             EmbedLimits(max_input_tokens=loaded.config.max_seq_length, **limits),
                             special_ids(loaded.tokenizer), loaded.source)
    log.info("embedding model %s: %d dimensions, %d tokens per input, %.1f MiB, linears in %s", loaded.source,
             loaded.config.hidden_size, loaded.config.max_seq_length, loaded.model.num_bytes / 2**20,
             str(loaded.model.linear_dtype).removeprefix("torch."))
    return embedder
