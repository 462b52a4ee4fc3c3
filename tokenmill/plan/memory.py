"""Memory model: how many KV blocks a replica's pool holds.

Bytes per KV token = 2 (K and V) x layers x kv_heads x head_dim x bytes per element. On a CPU
the engine's pool is its memory budget (--kv-cache-memory) in whole blocks (tokenmill.build);
on an accelerator it is what is left of utilization x memory after the weights, the
activation peak of the largest step and a fixed reserve (runtime, CUDA graphs), per chip:
tensor parallelism splits weights and KV heads across the chips of a replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import WEIGHT_BYTES, Hardware, ModelShape

# bfloat16 on CPU and bfloat16 on CUDA are the engine's KV dtypes for kv_cache_dtype="auto"
# (build.resolve_kv_dtype, with dtype="auto").
CPU_KV_BYTES = 2
GPU_KV_BYTES = 2


def kv_element_bytes(kv_cache_dtype: str, head_dim: int, auto: float = CPU_KV_BYTES) -> float:
    """Bytes per KV element for a --kv-cache-dtype; int8 rows carry a 4-byte scale per head_dim
    values (tokenmill/model/attention/kv_dtype.py)."""
    sizes = {"auto": auto, "float32": 4, "bfloat16": 2, "float16": 2, "int8": (head_dim + 4) / head_dim}
    return sizes[kv_cache_dtype]


def block_bytes(shape: ModelShape, block_size: int, kv_bytes: float, tp: int = 1) -> float:
    """One block of KV on one chip (a chip holds kv_heads / tp heads, at least one)."""
    heads_per_chip = max(1, shape.num_kv_heads // tp)
    return 2 * shape.num_layers * heads_per_chip * shape.head_dim * kv_bytes * block_size


def cpu_pool_blocks(shape: ModelShape, config: EngineConfig, kv_bytes: float | None = None) -> int:
    """The engine's pool on a CPU: the memory budget in whole blocks (or the explicit count).
    kv_bytes None: those of the config's kv_cache_dtype."""
    if config.cache.num_kv_blocks:
        return config.cache.num_kv_blocks
    if kv_bytes is None:
        kv_bytes = kv_element_bytes(config.cache.kv_cache_dtype, shape.head_dim)
    return max(1, int(config.cache.kv_cache_memory_bytes // block_bytes(shape, config.cache.block_size, kv_bytes)))


@dataclass(frozen=True)
class MemoryPlan:
    """Per chip of one replica."""

    capacity: float
    weights: float
    activations: float
    reserved: float
    block_bytes: float
    block_size: int

    @property
    def kv_budget(self) -> float:
        return self.capacity - self.weights - self.activations - self.reserved

    @property
    def num_blocks(self) -> int:
        return max(0, int(self.kv_budget // self.block_bytes))

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def fits(self) -> bool:
        return self.num_blocks > 0


def weight_bytes(shape: ModelShape, weight_format: str) -> float:
    """All weights, in the format's bytes (embedding and head included; they stay 16-bit in
    practice, a second-order error kept for simplicity)."""
    return shape.params_total * WEIGHT_BYTES[weight_format]


def activation_bytes(shape: ModelShape, max_num_batched_tokens: int, max_num_seqs: int, tp: int = 1,
                     act_bytes: float = 2) -> float:
    """Peak of the largest step: a few hidden-size buffers and the MLP's intermediate per token,
    plus float32 logits of the rows that sample."""
    per_token = (6 * shape.hidden_size + 3 * shape.intermediate_size * shape.experts_per_token / tp) * act_bytes
    return max_num_batched_tokens * per_token + max_num_seqs * shape.vocab_size * 4


def gpu_plan(shape: ModelShape, hw: Hardware, tp: int, weight_format: str, block_size: int = 16,
             max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, utilization: float = 0.9,
             reserve_gb: float = 2.0, kv_bytes: float = GPU_KV_BYTES) -> MemoryPlan:
    return MemoryPlan(
        capacity=hw.memory_bytes * utilization,
        weights=weight_bytes(shape, weight_format) / tp,
        activations=activation_bytes(shape, max_num_batched_tokens, max_num_seqs, tp),
        reserved=reserve_gb * 1e9,
        block_bytes=block_bytes(shape, block_size, kv_bytes, tp),
        block_size=block_size,
    )
