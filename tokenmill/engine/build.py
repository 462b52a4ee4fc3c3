"""Build an Engine from an EngineConfig: load the model, size the KV pool, wire the runner."""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import Engine
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.runner import ModelRunner, kv_block_bytes

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
    dtype = TORCH_DTYPES[config.dtype]
    max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    model = LlamaForCausalLM(cfg, loaded.weights, dtype, _linear_factory(config, dtype), max_model_len)
    block_bytes = kv_block_bytes(cfg, config.block_size, dtype)
    num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // block_bytes)
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
        num_blocks, config.block_size, num_blocks * config.block_size, num_blocks * block_bytes / 2**20,
    )
    runner = ModelRunner(model, num_blocks, config.block_size, config.seed)
    proposer = _build_proposer(config, loaded, draft_loaded, dtype, max_model_len, num_blocks)
    return Engine(config, runner, loaded.tokenizer, max_model_len, num_blocks, proposer)


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
    draft = LlamaForCausalLM(cfg, draft_loaded.weights, dtype, _linear_factory(config, dtype), max_model_len)
    log.info(
        "draft model: %d layers, its KV pool mirrors the target's %d blocks (%.1f MiB)",
        cfg.num_layers, num_blocks, num_blocks * kv_block_bytes(cfg, config.block_size, dtype) / 2**20,
    )
    return DraftModelProposer(ModelRunner(draft, num_blocks, config.block_size, config.seed))


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


def _linear_factory(config: EngineConfig, dtype: torch.dtype):
    try:
        from tokenmill.model.quant import make_linear
    except ImportError:  # quantized kernels not available: plain float linears
        return None

    def make(weight, bias):
        return make_linear(weight, bias, dtype, config.quantization, config.quant_group_size)

    return make
