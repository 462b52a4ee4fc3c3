"""Host -> device copies that keep the host off the critical path.

`torch.tensor(list, device=cuda)` and indexing a CUDA tensor with a Python list copy from
pageable memory, which blocks the host until the copy is done; so does `.to(cuda,
non_blocking=True)` from a pageable tensor. Staging through pinned memory lets the copy queue
behind the step's kernels instead. On CPU nothing changes.

Also: host memory that is zero without being written (lazy_zeros), for the KV pool.
"""

from __future__ import annotations

import math
import mmap

import torch


def to_device(values, device, dtype=torch.long):
    """Host list/CPU tensor -> device without a sync: pinned staging + async copy on CUDA (the
    caching host allocator keeps the pinned block alive until the copy has run); on CPU the
    tensor itself. `dtype` applies to a list only."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages the OS supplies (zeroed) when first touched: an anonymous
    mapping, so allocating costs nothing and resident memory grows with what is used.
    torch.zeros writes every byte at once: 1-2 s and the whole size resident for a 512 MiB KV
    pool at start-up, though a fresh server touches a few blocks. The tensor keeps the mapping
    alive."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # MAP_PRIVATE: Python's default for an anonymous map is MAP_SHARED, which a forked child
    # would write through to; private pages stay copy-on-write like any other allocation.
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)
