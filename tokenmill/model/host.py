"""Host -> device copies that keep the host off the critical path.

`torch.tensor(list, device=cuda)` and indexing a CUDA tensor with a Python list copy from
pageable memory, which blocks the host until the copy is done; so does `.to(cuda,
non_blocking=True)` from a pageable tensor. Staging through pinned memory lets the copy queue
behind the step's kernels instead. On CPU nothing changes.
"""

from __future__ import annotations

import torch


def to_device(values, device, dtype=torch.long):
    """Host list/CPU tensor -> device without a sync: pinned staging + async copy on CUDA (the
    caching host allocator keeps the pinned block alive until the copy has run); on CPU the
    tensor itself. `dtype` applies to a list only."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t
