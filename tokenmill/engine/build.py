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


def build_engine(config: EngineConfig, loaded=None) -> Engine:
    """`loaded` is anything with .config (ModelConfig), .weights (HF-named) and .tokenizer;
    by default config.model is loaded with tokenmill.model.loader."""
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
    return Engine(config, runner, loaded.tokenizer, max_model_len, num_blocks)


def _linear_factory(config: EngineConfig, dtype: torch.dtype):
    try:
        from tokenmill.model.quant import make_linear
    except ImportError:  # quantized kernels not available: plain float linears
        return None

    def make(weight, bias):
        return make_linear(weight, bias, dtype, config.quantization, config.quant_group_size)

    return make
