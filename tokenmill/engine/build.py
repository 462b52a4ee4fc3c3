"""Build an Engine from an EngineConfig: load the model, size the KV pool, wire the runner."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.runner import ModelRunner, Segment, kv_block_bytes

log = logging.getLogger("tokenmill")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_engine(config: EngineConfig, loaded=None, draft_loaded=None) -> Engine:
    """`loaded` is anything with .config (ModelConfig), .weights (HF-named) and .tokenizer;
    by default config.model is loaded with tokenmill.model.loader (and config.draft_model,
    or `draft_loaded`, is the draft for speculative_method="draft")."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if loaded is None:
        from tokenmill.model.loader import load_model

        loaded = load_model(config.model, config)
    cfg = loaded.config
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    model = LlamaForCausalLM(
        cfg, loaded.weights, dtype, _linear_factory(config, dtype, device), max_model_len,
        make_head=_linear_factory(config, dtype, device, head=True),
    )
    model.to(device)  # moves what was built on the host; weights made on the device stay put
    block_bytes = kv_block_bytes(cfg, config.block_size, dtype)
    if config.num_kv_blocks:
        num_blocks = config.num_kv_blocks
    elif device.type == "cuda":
        num_blocks = _cuda_num_blocks(model, config, block_bytes)
    else:
        num_blocks = max(1, config.kv_cache_memory_bytes // block_bytes)
    log.info(
        "KV cache on %s: %d blocks x %d tokens = %d tokens (%.1f MiB)", device,
        num_blocks, config.block_size, num_blocks * config.block_size, num_blocks * block_bytes / 2**20,
    )
    runner = ModelRunner(model, num_blocks, config.block_size, config.seed)
    if device.type == "cuda" and not config.enforce_eager:
        from tokenmill.model.cuda_graphs import DecodeGraphs

        max_blocks = -(-max_model_len // config.block_size)
        runner.decode_graphs = DecodeGraphs(runner, config.max_num_seqs, max_blocks)
    proposer = _build_proposer(config, loaded, draft_loaded, dtype, max_model_len, num_blocks)
    return Engine(config, runner, loaded.tokenizer, max_model_len, num_blocks, proposer)


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


@torch.inference_mode()
def _cuda_num_blocks(model: LlamaForCausalLM, config: EngineConfig, block_bytes: int) -> int:
    """Blocks that fit in gpu_memory_utilization of the GPU after the weights and the activation
    peak of the largest step (a profiling forward of max_num_batched_tokens tokens)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    n = config.max_num_batched_tokens
    probe = ModelRunner(model, -(-n // config.block_size), config.block_size)
    probe_bytes = probe.kv_caches.numel() * probe.kv_caches.element_size()
    hidden = probe.forward([Segment(list(range(probe.scratch_block)), 0, [0] * n)])
    model.compute_logits(hidden[: min(n, config.max_num_seqs)])
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - before - probe_bytes
    del probe, hidden
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = int(total * config.gpu_memory_utilization) - (total - free) - activations
    log.info(
        "GPU memory: %.1f GiB total, %.1f GiB in use (weights, other processes), activation peak %.2f GiB, "
        "KV budget %.1f GiB at utilization %.2f",
        total / 2**30, (total - free) / 2**30, activations / 2**30, budget / 2**30, config.gpu_memory_utilization,
    )
    if budget < block_bytes:
        raise ValueError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization={config.gpu_memory_utilization} "
            f"(weights and activations take {(total - free + activations) / 2**30:.1f} GiB of {total / 2**30:.1f})"
        )
    return budget // block_bytes


def _build_proposer(config: EngineConfig, loaded, draft_loaded, dtype, max_model_len: int, num_blocks: int):
    if config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        from tokenmill.spec.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    from tokenmill.spec.draft import DraftModelProposer

    if draft_loaded is None:
        if not config.draft_model:
            raise ValueError("speculative_method='draft' needs a draft_model")
        from tokenmill.model.loader import load_model

        draft_loaded = load_model(config.draft_model, config)
    check_same_tokenizer(loaded.tokenizer, draft_loaded.tokenizer)
    cfg = draft_loaded.config
    device = model_device = resolve_device(config.device)
    draft = LlamaForCausalLM(
        cfg, draft_loaded.weights, dtype, _linear_factory(config, dtype, device), max_model_len,
        make_head=_linear_factory(config, dtype, device, head=True),
    )
    draft.to(model_device)
    log.info(
        "draft model: %d layers, its KV pool mirrors the target's %d blocks (%.1f MiB)",
        cfg.num_layers, num_blocks, num_blocks * kv_block_bytes(cfg, config.block_size, dtype) / 2**20,
    )
    runner = ModelRunner(draft, num_blocks, config.block_size, config.seed)
    return DraftModelProposer(runner, loaded.config.vocab_size)


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
    quantization = config.quantization
    if device.type == "cuda" and quantization != "fp8":
        quantization = "none"  # the int4/int8 kernels are CPU ones: GGUF weights run dequantized
    if head and quantization == "fp8":
        quantization = "none"  # fp8 logits cost 2% perplexity on SmolLM2 for a small saving (docs/benchmarks.md)
    try:
        from tokenmill.model.quant import make_linear
    except ImportError:  # no gguf (e.g. a GPU box with only torch): float weights, fp8 or plain
        if quantization != "fp8":
            return None
        from tokenmill.model.fp8 import Fp8Linear

        return lambda weight, bias: Fp8Linear(weight, bias, dtype)

    def make(weight, bias):
        return make_linear(weight, bias, dtype, quantization, config.quant_group_size)

    return make
