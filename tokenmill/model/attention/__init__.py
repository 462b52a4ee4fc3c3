"""Paged attention: the step's metadata (metadata.py), the backend interface and its choice
(backend.py), and one module per backend: torch_backend.py (the reference, and the path for
what no kernel covers), cpu_backend.py (one C++ kernel for every CPU row), triton_backend.py (the GPU's
kernels, imported only when chosen, so CPU runs never pay for importing triton). kv_dtype.py: the
pool's element type (--kv-cache-dtype) and how rows are rounded or quantized into it."""

from tokenmill.model.attention.backend import AttentionBackend, choose_backend
from tokenmill.model.attention.metadata import AttentionMetadata, PrefillChunk
from tokenmill.model.attention.torch_backend import TorchAttention, torch_paged_attention, torch_write_kv

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillChunk",
    "TorchAttention",
    "choose_backend",
    "torch_paged_attention",
    "torch_write_kv",
]
