"""The interface the model calls attention through, and the choice of backend: made once, when
the model is built, from the device and what is available on it."""

from __future__ import annotations

import logging
import time
from typing import Protocol, TypeVar

import torch

from tokenmill.model.attention import cpu_backend
from tokenmill.model.attention.metadata import AttentionMetadata
from tokenmill.model.attention.torch_backend import TorchAttention

log = logging.getLogger("tokenmill")

Step = TypeVar("Step")


class AttentionBackend(Protocol[Step]):
    """Paged attention over a pool of [num_blocks, kv_heads, block_size, head_dim] per layer.
    `prepare` runs once per forward; every layer then writes and attends with its result."""

    name: str
    graph_capturable: bool  # whether a decode step through it may be captured as a CUDA graph

    def prepare(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> Step: ...

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """k, v [T, kv_heads, head_dim] into the pool at the step's slots."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: Step, scale: float) -> torch.Tensor:
        """[T, heads, head_dim]: each token's query over the keys its sequence has up to it."""


def choose_backend(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> AttentionBackend:
    """Triton's kernels on CUDA, the C++ kernel on the CPU, else the torch code. `dtype` is the
    model's (queries, outputs), `kv_dtype` the pool's (default: the model's)."""
    t0 = time.perf_counter()  # the C++ kernel is built once per machine and source (about 20 s), then loaded
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    backend = _choose(torch.device(device), dtype, kv_dtype)
    log.info("attention on %s: %s, KV in %s (%.1f s)", device, backend.name, kv_dtype, time.perf_counter() - t0)
    return backend


def _choose(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype) -> AttentionBackend:
    if device.type == "cuda":
        if not kv_dtype.is_floating_point:
            # Triton's kernels read float pools only: an int8 pool is dequantized as the torch
            # code gathers it (correct, slower, and no CUDA graphs).
            log.warning("KV cache in %s on CUDA: the torch attention path (dequantizing on gather)", kv_dtype)
            return TorchAttention()
        try:
            from tokenmill.model.attention.triton_backend import TritonAttention
        except ImportError:  # no triton: the torch code runs on the GPU too, only slower
            return TorchAttention()
        return TritonAttention()
    if device.type == "cpu" and dtype in cpu_backend.DTYPES and kv_dtype in cpu_backend.KV_DTYPES:
        kernel = cpu_backend.kernel()
        if kernel is not None:
            return cpu_backend.CpuAttention(kernel)
    return TorchAttention()
